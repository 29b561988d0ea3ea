"""Round 17 of attacks on the web page, in Debian's chromium driven by playwright against a real
uvicorn: a podcast or meeting-transcription user with long recordings, many speakers and big files.

The API runs in keys and queues of its own that no worker consumes (tests.conftest.parked_api),
so a job stays where the test puts it, moved on with the same ``JobStore`` calls a worker makes;
the results planted are what a worker writes, sized as a day's recording would make them.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import tone_wav
from tests.test_web import CHROMIUM, browser, keyed_page  # noqa: F401  (the fixture, shared)

KEY = "web-r17-key-a-0123456789"
NAME = "web-r17"  # its keys (aa-web-r17:), queues and storage
UPLOAD_LIMIT = 3_000_000  # the API's AUDIO_ANALYSIS_MAX_UPLOAD_BYTES here

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (scripts/dev.sh test installs it as root: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def store(settings) -> Iterator[Any]:
    from tests.conftest import parked_store

    yield parked_store(settings, NAME)


@pytest.fixture(scope="module")
def web(service_env, settings, tmp_path_factory) -> Iterator[str]:
    from tests.conftest import parked_api

    with parked_api(service_env, settings, tmp_path_factory, NAME, [KEY],
                    env={"AUDIO_ANALYSIS_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}) as base:
        yield base


def _submit(base: str, name: str) -> str:
    r = httpx.post(f"{base}/jobs/diarize", files={"file": (name, tone_wav(), "audio/wav")},
                   headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _succeed(store: Any, job_id: str, result: dict[str, Any]) -> None:
    """``job_id`` run and ended with ``result``, as a worker would record it."""
    assert store.mark_running(job_id) is not None
    assert store.finish(job_id, "succeeded", result=result)[1]


def _result(turns: int, speakers: int, seconds: float) -> dict[str, Any]:
    """A diarization of ``seconds`` with ``turns`` turns, each of one of ``speakers`` (at random,
    seeded), 90 % of its slot long."""
    rnd = random.Random(17)
    slot = seconds / turns
    rows = [{"start": round(i * slot, 3), "end": round(i * slot + 0.9 * slot, 3),
             "speaker": f"SPEAKER_{rnd.randrange(speakers):02d}"} for i in range(turns)]
    return {"diarization_results": rows, "processing_time": 1.0, "audio_duration": seconds,
            "segments_count": turns, "model_device": "cpu"}


def _show(page, job_id: str) -> float:
    """Clicks "show" on ``job_id``'s Recent row; the milliseconds until its timeline was drawn
    (performance.now() in the page, the record's fetch included), for the report only."""
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
    return page.evaluate("""id => new Promise(done => {
        const started = performance.now();
        document.querySelector(`#recent tbody tr[data-job-id='${id}'] button.show`).click();
        const drawn = () => document.querySelector('#timeline .lane') ? done(performance.now() - started)
                                                                       : setTimeout(drawn, 5);
        drawn();
    })""", job_id)


def _throttled(page, bytes_per_s: int) -> None:
    """Uploads from ``page`` at ``bytes_per_s`` (chromium's own network throttling, as DevTools
    does it)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": bytes_per_s})


# every turn of the result whose span meets what was drawn lies within a bar of its own lane; the
# result comes as its JSON text: playwright's serializer took 11-13 s to hand 100,000 turns over as
# an object, the page parses the same 100,000 from their text in milliseconds
UNDRAWN = """text => {
    const result = JSON.parse(text);
    const { from, to } = window.__drawn();
    const bars = new Map();
    for (const lane of document.querySelectorAll('#timeline .lane')) {
        bars.set(lane.dataset.speaker, [...lane.querySelectorAll('.turn')].map(
            b => [Number(b.dataset.start), Number(b.dataset.end)]));
    }
    const missing = [];
    let checked = 0;
    for (const t of result.diarization_results) {
        if (t.end < from || t.start > to) continue;
        checked += 1;
        if (!(bars.get(t.speaker) || []).some(([s, e]) => s <= t.start && e >= t.end)) missing.push(t);
    }
    return { checked, missing: missing.slice(0, 5), bars: document.querySelectorAll('#timeline .turn').length };
}"""

# the seconds of the recording in view, from the timeline's own scale (the track's width)
IN_VIEW = """() => window.__drawn = () => {
    const timeline = document.querySelector('#timeline');
    const track = timeline.querySelector('.track');
    const perSecond = track.getBoundingClientRect().width / window.__seconds;
    return { from: timeline.scrollLeft / perSecond, to: (timeline.scrollLeft + timeline.clientWidth - 144) / perSecond };
}"""


def test_a_days_turns_are_drawn_without_freezing_the_page(web, store, browser) -> None:  # noqa: F811
    """A day's recording of 30 speakers, 100,000 turns (the service takes 24 h of audio). Before:
    one element per turn, every one placed again at each step of the zoom: in this chromium the
    timeline took 7.5 s to show and each zoom step 1.7 s, the page frozen meanwhile (measured with
    performance.now(); the timings are printed, not asserted). Now the turns in view (and half a
    view either side) are drawn, and a speaker with more of them there than one per 4 px has those
    less than a pixel apart drawn as one bar: the bars drawn are bounded by the pixels in view,
    and every turn in view still lies within one of its speaker's bars, at any zoom and scroll;
    zoomed in, each turn is a bar of its own again."""
    seconds = 8 * 3600.0
    result = _result(100_000, 30, seconds)
    result_text = json.dumps(result)
    job_id = _submit(web, "all-day-call-centre.wav")
    _succeed(store, job_id, result)
    page = keyed_page(browser, web, KEY)
    shown_ms = _show(page, job_id)
    page.evaluate(f"window.__seconds = {seconds}")
    page.evaluate(IN_VIEW)
    drawn = page.evaluate(UNDRAWN, result_text)
    assert drawn["checked"] > 90_000 and drawn["missing"] == [], drawn
    assert drawn["bars"] < 10_000, drawn  # one element per turn before: 100,000
    steps = page.evaluate("""async () => {
        const zoom = document.querySelector('#zoom');
        const frame = () => new Promise(done => requestAnimationFrame(() => done()));
        const started = performance.now();
        for (const value of [2, 4, 8, 16, 40]) {
            zoom.value = value;
            zoom.dispatchEvent(new Event('input'));
            await frame();  // drawn there
            document.body.offsetHeight;  // and laid out
        }
        return (performance.now() - started) / 5;
    }""")
    # zoomed in 40 times and scrolled to the middle of the day: what is in view is drawn there
    page.evaluate("() => { const t = document.querySelector('#timeline'); t.scrollLeft = t.scrollWidth / 2; }")
    page.wait_for_function("""() => {
        const t = document.querySelector('#timeline');
        return [...t.querySelectorAll('.turn')].some(b => parseFloat(b.style.left) >= t.scrollLeft);
    }""", timeout=10_000)
    drawn = page.evaluate(UNDRAWN, result_text)
    assert drawn["checked"] > 500 and drawn["missing"] == [], drawn
    assert page.query_selector("#timeline .turn[data-turns]") is None  # one bar a turn
    print(f"\n100,000 turns: shown in {shown_ms:.0f} ms, a zoom step {steps:.0f} ms, {drawn['bars']} bars at zoom 40")
    assert page.errors == []
    page.close()


def test_thirty_two_speakers_each_look_their_own(web, store, browser) -> None:  # noqa: F811
    """Before: the timeline had 10 colours, so speakers 1, 11, 21 and 31 were drawn alike (and
    so on); a recording of a panel or a classroom has 30 voices and more. Now each has a colour
    and, past the tenth, a pattern of its own, shown beside its name too."""
    result = _result(640, 32, 600.0)
    job_id = _submit(web, "panel-of-thirty-two.wav")
    _succeed(store, job_id, result)
    page = keyed_page(browser, web, KEY, width=1280, height=1600)
    _show(page, job_id)
    looks = page.eval_on_selector_all("#timeline .lane", """lanes => lanes.map(lane => {
        const look = el => { const s = getComputedStyle(el); return [s.backgroundColor, s.backgroundImage, s.boxShadow].join(' | '); };
        const swatch = lane.querySelector('.lane-label .swatch');
        return [look(lane.querySelector('.turn')), swatch && look(swatch)];
    })""")
    assert len(looks) == 32
    assert len({turn for turn, _ in looks}) == 32, sorted(turn for turn, _ in looks)
    assert all(turn == swatch for turn, swatch in looks), looks
    assert page.errors == []
    page.close()


def test_an_upload_over_the_limit_is_refused_before_it_is_all_sent(web, browser, tmp_path) -> None:  # noqa: F811
    """A recording larger than the service takes (AUDIO_ANALYSIS_MAX_UPLOAD_BYTES): the API
    answers 413 from the request's Content-Length, before any of the body. Before: it kept the
    connection open, so chromium sent all of the body before it read the answer (a 500 MB file
    uploaded in full, minutes on a home uplink, to be told it was too large); the progress went to
    100 % first. Now the connection closes with the 413 and the page says it while most of the
    file is still unsent. The upload runs at 2 MB/s, as over a real uplink."""
    big = tmp_path / "two-hour-podcast.wav"
    with open(big, "wb") as f:
        f.write(tone_wav(1.0))
        f.truncate(20_000_000)
    page = keyed_page(browser, web, KEY)
    _sent_share(page)
    _throttled(page, 2_000_000)
    page.set_input_files("#files", str(big))
    page.click("#submit")
    page.wait_for_selector("#submit-error:not(:empty)", timeout=60_000)
    error = page.inner_text("#submit-error")
    assert "413" in error and f"limit of {UPLOAD_LIMIT} bytes" in error, error
    assert page.evaluate("window.__sent") < 0.5, page.evaluate("window.__sent")
    assert page.errors == []
    page.close()


def _jobs_named(base: str, *names: str) -> list[str]:
    r = httpx.get(f"{base}/jobs?limit=100", headers={"X-API-Key": KEY}, timeout=10)
    assert r.status_code == 200, r.text
    return [j["filename"] for j in r.json()["jobs"] if j["filename"] in names]


def test_an_upload_can_be_cancelled_and_what_was_not_sent_stays_picked(web, browser, tmp_path) -> None:  # noqa: F811
    """The wrong recording chosen, or one too big for the uplink: before, an upload had no
    cancel; it went on to its end (minutes for hundreds of MB) and made a job, and the only way
    out was to close the page. Now "cancel upload" stops it: no job, the batch's files not sent
    are still picked, and Submit sends them."""
    files = [tmp_path / f"long-interview-{n}.wav" for n in ("one", "two")]
    for f in files:
        f.write_bytes(tone_wav(8.0))  # 256 KB: 4 s to send at 64 KB/s
    names = [f.name for f in files]
    page = keyed_page(browser, web, KEY)
    _throttled(page, 64_000)
    page.set_input_files("#files", [str(f) for f in files])
    page.click("#submit")
    page.wait_for_selector("#submit-status:has-text('long-interview-one.wav (1 of 2): ')")
    page.focus("#cancel-upload")
    page.keyboard.press("Enter")  # from the keyboard: the focus goes on from Submit, not the page's top
    page.wait_for_selector("#submit-status:has-text('upload cancelled')")
    assert page.evaluate("document.activeElement.id") == "submit"
    assert page.inner_text("#submit-status") == f"upload cancelled: {', '.join(names)} not sent"
    assert page.inner_text("#submit-error") == ""
    assert page.is_hidden("#cancel-upload")
    assert page.inner_text("#picked") == ", ".join(names)
    assert page.query_selector(".job") is None
    assert _jobs_named(web, *names) == []
    # sent again, to its end: both are jobs, once each
    _throttled(page, 4_000_000)
    page.click("#submit")
    page.wait_for_function("() => document.querySelectorAll('.job').length === 2", timeout=30_000)
    assert sorted(_jobs_named(web, *names)) == names
    assert page.inner_text("#picked") == "" and page.inner_text("#submit-status") == ""
    assert page.errors == []
    page.close()


def test_leaving_the_page_during_an_upload_asks_first(web, browser, tmp_path) -> None:  # noqa: F811
    """A reload, back, or the "API docs" link while a recording uploads: before, the page left
    at once and the upload was dropped, nothing sent and no job made, minutes into a big file.
    Now the browser asks first; staying lets the upload finish. With nothing uploading it
    leaves without asking."""
    recording = tmp_path / "board-meeting.wav"
    recording.write_bytes(tone_wav(6.0))  # 192 KB: 3 s to send at 64 KB/s
    page = keyed_page(browser, web, KEY)
    _throttled(page, 64_000)
    page.set_input_files("#files", str(recording))
    page.click("#submit")
    page.wait_for_selector("#submit-status:has-text('board-meeting.wav: ')")
    with page.expect_event("dialog") as asked:
        page.evaluate("() => { setTimeout(() => location.reload(), 0); }")
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()  # stay
    page.wait_for_selector(".job", timeout=30_000)
    assert _jobs_named(web, recording.name) == [recording.name]
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.type), d.dismiss()))
    page.reload()
    page.wait_for_selector(".job")  # followed again after the reload
    assert dialogs == []
    assert page.errors == []
    page.close()


def test_a_failed_download_is_said_beside_the_download_buttons(web, store, browser) -> None:  # noqa: F811
    """A job whose record expired while its timeline was on the screen: before, its RTTM, SRT or
    WebVTT download put "404: ..." in the submit panel's error line, at the top of the page, out
    of sight of the timeline, and the click seemed to do nothing."""
    job_id = _submit(web, "weekly-sync.wav")
    _succeed(store, job_id, _result(40, 3, 120.0))
    page = keyed_page(browser, web, KEY, width=1280, height=700)
    _show(page, job_id)
    store.redis.delete(store._job_key(job_id))  # expired meanwhile
    page.click(".downloads button[data-format='srt']")
    page.wait_for_selector("#download-error:not(:empty)", timeout=10_000)
    said = page.inner_text("#download-error")
    assert said.startswith("SRT: 404") and "expired" in said, said
    assert page.is_visible("#download-error")
    assert page.inner_text("#submit-error") == ""
    assert page.errors == []
    page.close()


def test_each_jobs_buttons_are_named_for_a_screen_reader(web, store, browser) -> None:  # noqa: F811
    """A screen reader in "This session's jobs" (rows of a grid, no table to give a button its
    context): before, a batch's rows were so many buttons all read as "cancel" and as "show", and
    Recent jobs' as "follow" and "show", with nothing to tell whose; the progress bars were not
    read at all. Now each is named after its job (file, and for Recent when it was sent)."""
    open_id = _submit(web, "standup-monday.wav")
    done_id = _submit(web, "standup-tuesday.wav")
    _succeed(store, done_id, _result(10, 2, 30.0))
    page = keyed_page(browser, web, KEY)
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{open_id}'] button.follow")
    created = {j["job_id"]: j["created_at"].replace("T", " ")[:19] for j in httpx.get(
        f"{web}/jobs?limit=100", headers={"X-API-Key": KEY}, timeout=10).json()["jobs"]}
    recent = page.locator("#recent")
    recent.get_by_role("button", name=f"follow standup-monday.wav of {created[open_id]}", exact=True).click()
    recent.get_by_role("button", name=f"show standup-tuesday.wav of {created[done_id]}", exact=True).click()
    page.wait_for_selector("#timeline .lane")
    jobs = page.locator("#jobs")
    jobs.get_by_role("button", name="cancel standup-monday.wav", exact=True).wait_for()
    bar = jobs.get_by_role("progressbar", name="standup-monday.wav", exact=True)
    assert bar.get_attribute("aria-valuenow") == "0"
    assert page.get_by_role("button", name="download RTTM", exact=True).count() == 1
    assert page.errors == []
    page.close()


def test_back_from_the_api_docs_keeps_what_was_chosen_submittable(web, browser, tmp_path) -> None:  # noqa: F811
    """Files chosen and a URL typed, then "API docs" and back: the browser puts the files and the
    URL back in their fields. Before, the page took them for nothing picked: the files were not
    listed and Submit stayed off, with the URL in its field. Now they are listed and sent."""
    recording = tmp_path / "town-hall.wav"
    recording.write_bytes(tone_wav())
    page = keyed_page(browser, web, KEY)
    page.set_input_files("#files", str(recording))
    page.fill("#audio-url", "https://media.example.org/town-hall-2.wav")
    page.click("a[href='/docs']")
    page.wait_for_selector(".swagger-ui .info")
    page.go_back()
    page.wait_for_function("() => document.querySelector('#files').files.length === 1")
    assert page.input_value("#audio-url") == "https://media.example.org/town-hall-2.wav"
    page.wait_for_selector("#submit:enabled")
    assert page.inner_text("#picked") == recording.name
    page.click("#submit")
    page.wait_for_function("() => document.querySelectorAll('.job').length === 2")
    assert sorted(_jobs_named(web, recording.name, "town-hall-2.wav")) == ["town-hall-2.wav", recording.name]
    assert page.input_value("#audio-url") == "" and page.inner_text("#submit-error") == ""
    assert page.errors == []
    page.close()


def test_the_lists_come_back_with_the_service(service_env, store, browser, tmp_path) -> None:  # noqa: F811
    """The API restarted (a deploy) while the page is open. Before: the jobs followed picked up
    again once it was back, but Recent jobs went on saying "the service did not answer", and not
    that the job had ended, until "refresh" was clicked. Now a list the service did not answer is
    read again every 5 s until it answers. The API is stopped and started again on its
    port, in the module's keys and queues."""
    from cli.launcher import Stack, free_port
    from tests.conftest import wait_for_api

    env = {**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")},
           "AUDIO_ANALYSIS_API_KEYS": json.dumps([KEY]), "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": f"aa-{NAME}",
           "AUDIO_ANALYSIS_QUEUE_NAME": f"audio-{NAME}", "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": f"webhooks-{NAME}",
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "uploads")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def start() -> Stack:
        stack = Stack(env=env, log_dir=tmp_path)
        wait_for_api(base, stack.start_api("127.0.0.1", port))
        return stack

    stack = start()
    try:
        job_id = _submit(base, "while-it-deploys.wav")
        page = keyed_page(browser, base, KEY)
        page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.follow").click()
        page.wait_for_selector(f".job[data-job-id='{job_id}'][data-status='queued']")
        stack.stop()
        page.click("#refresh")
        page.wait_for_selector("#recent tbody .error:has-text('did not answer')")
        stack = start()
        _succeed(store, job_id, _result(10, 2, 30.0))
        page.wait_for_selector(f".job[data-job-id='{job_id}'][data-status='succeeded']", timeout=20_000)
        page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'][data-status='succeeded']", timeout=20_000)
        assert page.query_selector("#recent tbody .error") is None
        assert page.errors == []
        page.close()
    finally:
        stack.stop()


def test_a_big_batch_followed_through_an_outage_is_not_read_every_2_s(service_env, store, browser,  # noqa: F811
                                                                      tmp_path) -> None:
    """40 unfinished jobs followed, the service stopped (a deploy). Before: a job whose reading
    failed was read again every 2 s, whatever the number followed (round 16's bound, about 8
    requests a second from a tab, held only while readings succeeded): 20 requests a second from
    one tab at a service on its way back, 100 for a batch of 200. Now a failed reading waits as
    long as a successful one (5 s each for 40). The window counts requests, not time: a slow host
    only makes fewer."""
    from cli.launcher import Stack, free_port
    from tests.conftest import wait_for_api

    env = {**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")},
           "AUDIO_ANALYSIS_API_KEYS": json.dumps([KEY]), "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": f"aa-{NAME}",
           "AUDIO_ANALYSIS_QUEUE_NAME": f"audio-{NAME}", "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": f"webhooks-{NAME}",
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "uploads")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack = Stack(env=env, log_dir=tmp_path)
    try:
        wait_for_api(base, stack.start_api("127.0.0.1", port))
        ids = [_submit(base, f"outage-{i:02d}.wav") for i in range(40)]
        page = keyed_page(browser, base, KEY)
        page.evaluate("ids => sessionStorage.setItem('audio-analysis.followed-jobs', JSON.stringify(ids))", ids)
        page.reload()
        page.wait_for_function("n => document.querySelectorAll('.job[data-status=\"queued\"]').length === n",
                               arg=len(ids), timeout=30_000)
    finally:
        stack.stop()
    page.wait_for_function("n => [...document.querySelectorAll('.job .step')].filter("
                           "s => s.textContent.includes('did not answer')).length === n", arg=len(ids), timeout=30_000)
    start = len(page.requests.urls)
    page.wait_for_timeout(10_000)
    polls = [u for u in page.requests.urls[start:] if u.rsplit("/", 1)[-1] in ids]
    # every 2 s: about 200 in 10 s; now at most 3 each (one every 5 s)
    assert len(polls) <= 3 * len(ids), len(polls)
    assert page.errors == []
    page.close()


def _sent_share(page) -> None:
    """``window.__sent``: the largest share of an upload's body the browser reported sent."""
    page.evaluate("""() => {
        window.__sent = 0;
        const send = XMLHttpRequest.prototype.send;
        XMLHttpRequest.prototype.send = function (body) {
            this.upload.addEventListener('progress', e => { window.__sent = Math.max(window.__sent, e.loaded / e.total); });
            return send.call(this, body);
        };
    }""")


def test_a_mistyped_key_or_speaker_count_is_told_before_the_file_is_sent(web, browser, tmp_path) -> None:  # noqa: F811
    """Before: a recording sent with a mistyped API key was uploaded in full (the API answered
    401 from the request's headers, but kept the connection, so chromium sent all of the body
    first): 500 MB with a wrong key is minutes on a home uplink. And "Speakers 0" (the field's
    own minimum is 1) sent the whole file to be refused 422. Now the 401 closes the connection
    and is said while most of the file is unsent, and a number field out of its range is said at
    the field, with nothing sent. The upload runs at 2 MB/s, as over a real uplink."""
    big = tmp_path / "quarterly-review.wav"
    with open(big, "wb") as f:
        f.write(tone_wav(1.0))
        f.truncate(20_000_000)
    page = keyed_page(browser, web, KEY[:-1] + "X")  # one character off
    _sent_share(page)
    _throttled(page, 2_000_000)
    page.set_input_files("#files", str(big))
    page.click("#submit")
    page.wait_for_selector("#submit-error:not(:empty)", timeout=60_000)
    assert "401" in page.inner_text("#submit-error"), page.inner_text("#submit-error")
    assert page.evaluate("window.__sent") < 0.5, page.evaluate("window.__sent")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.set_input_files("#files", str(big))
    page.fill("#num-speakers", "0")
    asked = len(page.requests.urls)
    page.click("#submit")
    page.wait_for_timeout(500)
    assert not [u for u in page.requests.urls[asked:] if u.endswith("/jobs/diarize")]
    assert page.evaluate("document.querySelector('#num-speakers').validity.rangeUnderflow")
    assert page.is_enabled("#submit") and page.inner_text("#picked") == big.name
    assert page.errors == []
    page.close()


def test_an_enrollments_upload_shows_its_progress_and_leaving_asks_first(web, browser, tmp_path) -> None:  # noqa: F811
    """A person enrolled from a few long recordings. Before: the enrollment went by fetch, so the
    button said "enrolling…" for all the minutes the files took to send, and a reload or a click
    on "API docs" meanwhile dropped them without asking, as a diarization's upload no longer
    does. Now it is sent as the other uploads are: its progress on the button, and leaving asks.
    (No worker runs here: the service's answer, whatever it is, is said in the panel.)"""
    files = [tmp_path / f"alice-{n}.wav" for n in (1, 2)]
    for f in files:
        f.write_bytes(tone_wav(6.0))  # 192 KB each: 6 s to send at 64 KB/s
    page = keyed_page(browser, web, KEY)
    _throttled(page, 64_000)
    page.fill("#vp-label", "Alice")
    page.set_input_files("#vp-files", [str(f) for f in files])
    page.click("#vp-enroll")
    page.wait_for_selector("#vp-enroll:has-text('sending ')")
    assert page.is_disabled("#vp-enroll")
    with page.expect_event("dialog") as asked:
        page.evaluate("() => { setTimeout(() => location.reload(), 0); }")
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()
    page.wait_for_function("() => document.querySelector('#vp-enroll').textContent === 'Enroll'", timeout=60_000)
    assert "503" in page.inner_text("#vp-error"), page.inner_text("#vp-error")  # no worker: refused at once
    assert page.errors == []
    page.close()


def test_a_result_without_speech_says_so(web, store, browser) -> None:  # noqa: F811
    """A recording in which no speech was found (silence, music, a dial tone): before, the
    timeline was an empty box and the summary read "0 speakers, 0 turns, 12.0 s; ", cut short,
    as if the page had failed to draw the result. Now both say that no speech was found; a
    result with speech is summed up as before, one speaker said as one."""
    empty = _submit(web, "hold-music.wav")
    _succeed(store, empty, {"diarization_results": [], "processing_time": 1.0, "audio_duration": 12.0,
                            "segments_count": 0, "model_device": "cpu"})
    spoken = _submit(web, "voicemail.wav")
    _succeed(store, spoken, _result(3, 1, 30.0))
    page = keyed_page(browser, web, KEY, width=1280, height=900)
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{empty}'] button.show").click()
    page.wait_for_selector("#summary:not(:empty)", timeout=10_000)
    assert page.inner_text("#summary") == "No speech found in 12.0 s of audio: no speaker, no turn."
    assert page.inner_text("#timeline").strip() == "No speech found in this recording."
    assert page.is_visible("#timeline .no-speech")
    assert page.eval_on_selector_all("#timeline .lane", "lanes => lanes.length") == 0

    _show(page, spoken)
    summary = page.inner_text("#summary")
    assert summary.startswith("1 speaker, 3 turns, 30.0 s; SPEAKER_00 "), summary
    assert page.query_selector("#timeline .no-speech") is None
    assert page.errors == []
    page.close()
