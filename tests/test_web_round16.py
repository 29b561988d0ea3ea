"""Round 16 of attacks on the web page, in Debian's chromium driven by playwright against a real
uvicorn: a user who changes the API key mid-session (a shared screen, a wrong key typed first).

The API runs in keys and queues of its own that no worker consumes (tests.conftest.parked_api),
so a job stays where the test puts it, moved on with the same ``JobStore`` calls a worker makes.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import tone_wav
from tests.test_web import CHROMIUM, browser, keyed_page  # noqa: F401  (the fixture, shared)

KEY_A = "web-r16-key-a-0123456789"
KEY_B = "web-r16-key-b-0123456789"
NAME = "web-r16"  # its keys (aa-web-r16:), queues and storage

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

    with parked_api(service_env, settings, tmp_path_factory, NAME, [KEY_A, KEY_B]) as base:
        yield base


def _submit(base: str, key: str, name: str) -> str:
    r = httpx.post(f"{base}/jobs/diarize", files={"file": (name, tone_wav(), "audio/wav")},
                   headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


# a result as a worker writes it: one turn of one speaker
ONE_TURN = {"diarization_results": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00"}],
            "processing_time": 0.1, "audio_duration": 1.0, "segments_count": 1, "model_device": "cpu"}


def _succeed(store: Any, job_id: str, result: dict[str, Any] = ONE_TURN) -> None:
    """``job_id`` run and ended with ``result``, as a worker would record it."""
    assert store.mark_running(job_id) is not None
    assert store.finish(job_id, "succeeded", result=result)[1]


def test_a_new_key_shows_nothing_of_the_previous_keys_jobs(web, store, browser) -> None:  # noqa: F811
    """Before: after the key field changed, "This session's jobs" still listed the previous key's
    jobs (their names, and "404: job not found" from polling them under the new key), and the
    result panel still showed the previous key's timeline, its speakers' names and its downloads."""
    done_id = _submit(web, KEY_A, "board-meeting-secret.wav")
    open_id = _submit(web, KEY_A, "salary-review-secret.wav")
    _succeed(store, done_id, {**ONE_TURN, "diarization_results": [
        {"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00", "identity": "Alice Secret"}]})

    page = keyed_page(browser, web, KEY_A)
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{done_id}'] button.show")
    page.click(f"#recent tbody tr[data-job-id='{done_id}'] button.show")
    page.wait_for_selector("#timeline .lane")
    page.click(f"#recent tbody tr[data-job-id='{open_id}'] button.follow")
    page.wait_for_selector(f".job[data-job-id='{open_id}'][data-status='queued']")

    # another person takes the screen and types their own key: from that moment on (not only once
    # the new key's lists came back, which on a loaded service takes seconds) nothing of the first
    # key's is shown, so no "follow" or "show" of its rows can be clicked under the new key
    shown = page.evaluate("""key => {
        const field = document.querySelector('#api-key');
        field.value = key;
        field.dispatchEvent(new Event('change'));
        return document.querySelector('#recent tbody').textContent + document.querySelector('#voiceprints tbody').textContent;
    }""", KEY_B)
    assert "secret" not in shown, shown
    page.wait_for_selector("#recent tbody:not(:has(tr))", state="attached", timeout=15_000)
    page.wait_for_timeout(1000)  # a poll of the followed job under the new key comes and goes
    text = page.inner_text("body")
    assert "secret" not in text.lower(), text
    assert page.query_selector(".job") is None
    assert page.is_hidden("#result-panel")
    assert page.evaluate("sessionStorage.getItem('audio-analysis.followed-jobs')") in (None, "[]")

    # the first key back: its jobs are there again, from the service, and nothing broke
    page.fill("#api-key", KEY_A)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{open_id}']")
    assert page.errors == []
    page.close()




def test_a_key_pasted_with_a_typographic_dash_is_told_in_words(web, browser) -> None:  # noqa: F811
    """A key copied from a document whose editor made its hyphens into dashes: before, every list
    and every submit said the browser's "Failed to execute 'fetch' on 'Window': ... String contains
    non ISO-8859-1 code point", which named neither the key nor what was wrong with it."""
    page = keyed_page(browser, web, KEY_A.replace("-", "\u2013"))
    page.wait_for_selector("#recent tbody .error")
    page.wait_for_selector("#voiceprints tbody .error")
    page.fill("#audio-url", "http://127.0.0.1:9/x.wav")
    page.click("#submit")
    page.wait_for_selector("#submit-error:not(:empty)")
    for where in ("#recent tbody", "#voiceprints tbody", "#submit-error"):
        text = page.inner_text(where)
        assert "API key" in text and "U+2013" in text and "Failed to execute" not in text, (where, text)
        assert KEY_A[:10] not in text  # the key itself is not put on the screen
    assert page.errors == []
    page.close()


def test_a_long_file_name_does_not_widen_the_page_on_a_phone(web, store, browser, tmp_path) -> None:  # noqa: F811
    """A name with nowhere to break (underscores, no spaces or hyphens): before, the picked line,
    the refusal, the job's row, the result's title and the Recent row each stretched the page to
    about 2,000 px on a 375 px phone, so every panel scrolled sideways under the thumb."""
    width = 375
    recording = tmp_path / ("Quarterly_all_hands_recording_" * 8 + ".wav")
    recording.write_bytes(tone_wav())
    page = keyed_page(browser, web, "not-a-key-of-this-service", width=width, height=800)

    def fits(when: str) -> None:
        assert page.evaluate("document.documentElement.scrollWidth") <= width, when

    page.set_input_files("#files", str(recording))
    fits("picked")
    page.click("#submit")
    page.wait_for_selector("#submit-error:not(:empty)")
    assert "401" in page.inner_text("#submit-error")
    fits("refused")
    page.fill("#api-key", KEY_A)
    page.dispatch_event("#api-key", "change")
    page.set_input_files("#files", str(recording))
    page.click("#submit")
    row = page.wait_for_selector(".job[data-status='queued']")
    job_id = row.get_attribute("data-job-id")
    _succeed(store, job_id)
    page.wait_for_selector("#timeline .lane")
    page.click("#refresh")
    page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
    fits("shown")
    assert page.errors == []
    page.close()


def test_a_recording_plays_again_after_another_job_was_shown(web, store, browser, tmp_path) -> None:  # noqa: F811
    """Before: a job submitted from the page was shown with its recording; another job shown from
    Recent jobs (no recording) took the player's source away but left it marked as the first
    job's, so "show" on the first job again set no source: its turns played nothing, and the page
    asked to open a recording it had."""
    recording = tmp_path / "with-audio.wav"
    recording.write_bytes(tone_wav())
    page = keyed_page(browser, web, KEY_A)
    page.set_input_files("#files", str(recording))
    page.click("#submit")
    mine = page.wait_for_selector(".job[data-status='queued']").get_attribute("data-job-id")
    other = _submit(web, KEY_A, "from-a-script.wav")
    for job_id in (mine, other):
        _succeed(store, job_id)
    page.wait_for_selector(f".job[data-job-id='{mine}'][data-status='succeeded']")
    page.wait_for_selector("#timeline .lane")
    assert page.evaluate("document.querySelector('#audio').src").startswith("blob:")

    page.click("#refresh")
    page.click(f"#recent tbody tr[data-job-id='{other}'] button.show")
    page.wait_for_selector("#result-title:has-text('from-a-script.wav')")
    assert page.evaluate("document.querySelector('#audio').src") == ""

    page.click(f".job[data-job-id='{mine}'] .show")
    page.wait_for_selector("#result-title:has-text('with-audio.wav')")
    assert page.evaluate("document.querySelector('#audio').src").startswith("blob:")
    assert page.is_hidden("#no-audio")
    assert page.errors == []
    page.close()


def test_show_in_recent_jobs_brings_the_timeline_into_view(web, store, browser) -> None:  # noqa: F811
    """Before: "show" on a row of Recent jobs (the page's last panel) drew the timeline in the
    result panel far above and left the view where it was, so on a phone nothing seemed to happen
    (the compare and identify answers were scrolled to; the timeline was not)."""
    job_id = _submit(web, KEY_A, "shown-from-recent.wav")
    _succeed(store, job_id)
    page = keyed_page(browser, web, KEY_A, width=375, height=700)
    show = page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
    show.scroll_into_view_if_needed()
    show.focus()
    page.keyboard.press("Enter")  # from the keyboard, as the main actions must work
    page.wait_for_selector("#timeline .lane")
    page.wait_for_function(
        "() => { const r = document.querySelector('#result-panel').getBoundingClientRect();"
        " return r.top < innerHeight && r.bottom > 0; }", timeout=5_000)
    # the keyboard goes on from the result
    assert page.evaluate("document.activeElement.id") == "result-title"
    assert page.errors == []
    page.close()


def _throttled(page, bytes_per_s: int) -> None:
    """Uploads from ``page`` at ``bytes_per_s`` (chromium's own network throttling, as DevTools
    does it): a recording takes seconds to send, as over a real uplink, and the test can act while
    it goes."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": bytes_per_s})


def _jobs_of(base: str, key: str) -> list[str]:
    r = httpx.get(f"{base}/jobs?limit=100", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 200, r.text
    return [j["filename"] for j in r.json()["jobs"]]


def test_while_a_batch_uploads_new_picks_and_a_new_key_do_not_go_astray(web, browser, tmp_path) -> None:  # noqa: F811
    """Before: a key typed in while a batch uploaded sent the rest of the batch under the new key
    (part of one person's files to another account); files picked while it uploaded were dropped
    without a word when it ended (the picked line cleared, Submit off)."""
    first, second, later = (tmp_path / f"batch-{n}.wav" for n in ("first", "second", "picked-later"))
    for f in (first, second, later):
        f.write_bytes(tone_wav(4.0))  # 128 KB: 2 s to send at 64 KB/s
    page = keyed_page(browser, web, KEY_A)
    _throttled(page, 64_000)
    before_a, before_b = _jobs_of(web, KEY_A), _jobs_of(web, KEY_B)
    page.set_input_files("#files", [str(first), str(second)])
    page.click("#submit")
    page.wait_for_selector("#submit-status:has-text('batch-first.wav (1 of 2)')")
    page.set_input_files("#files", str(later))  # the next recording, chosen while the batch goes
    page.fill("#api-key", KEY_B)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#submit-status:empty", state="attached", timeout=60_000)
    assert page.inner_text("#submit-error") == ""
    sent_a = [n for n in _jobs_of(web, KEY_A) if n not in before_a]
    assert sorted(sent_a) == ["batch-first.wav", "batch-second.wav"]
    assert _jobs_of(web, KEY_B) == before_b
    # the pick made meanwhile is still there, ready to submit
    assert page.inner_text("#picked") == "batch-picked-later.wav"
    assert page.is_enabled("#submit")
    assert page.errors == []
    page.close()


def test_show_of_a_job_gone_since_it_was_listed_says_so_in_its_row(web, store, browser) -> None:  # noqa: F811
    """Before: "show" on a Recent row whose job had expired since the list was read put "404: no
    job ..." in the submit panel's error line, at the top of the page, out of sight of the row
    (the last panel): on a phone nothing seemed to happen."""
    job_id = _submit(web, KEY_A, "expires-soon.wav")
    _succeed(store, job_id)
    page = keyed_page(browser, web, KEY_A, width=375, height=700)
    show = page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
    store.redis.delete(store._job_key(job_id))  # its record expired meanwhile
    show.click()
    row = f"#recent tbody tr[data-job-id='{job_id}']"
    page.wait_for_selector(f"{row}:has-text('404')", timeout=10_000)
    assert "expired" in page.inner_text(row)
    assert page.is_visible(f"{row} .error")
    assert page.errors == []
    page.close()


def test_a_service_gone_away_is_said_in_words(service_env, settings, tmp_path_factory,
                                                                     browser) -> None:  # noqa: F811
    """Before: with the API stopped (a restart, a deploy), the lists and a followed job's row said
    the browser's "Failed to fetch", where an upload said "the service did not answer"."""
    from tests.conftest import parked_api

    with parked_api(service_env, settings, tmp_path_factory, NAME + "-gone", [KEY_A]) as base:
        job_id = _submit(base, KEY_A, "while-it-restarts.wav")
        page = keyed_page(browser, base, KEY_A)
        page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.follow").click()
        page.wait_for_selector(f".job[data-job-id='{job_id}'][data-status='queued']")
    page.click("#refresh")
    page.wait_for_selector("#recent tbody .error")
    page.wait_for_selector(f".job[data-job-id='{job_id}'] .step:has-text('did not answer')", timeout=10_000)
    for text in (page.inner_text("#recent tbody"), page.inner_text(f".job[data-job-id='{job_id}'] .step")):
        assert "the service did not answer" in text and "Failed to fetch" not in text, text
    assert page.errors == []
    page.close()


def test_a_big_batch_followed_is_not_read_twice_a_second_each(web, browser) -> None:  # noqa: F811
    """Before: every unfinished job the tab followed was read every 0.5 s, however many: a batch
    of 16 was some 32 requests a second from one tab (200: 400), on the browser's six connections
    to the service, ahead of the lists and the next upload. Fewer requests on a slow host only
    make this pass more easily: it bounds a count, not a time."""
    ids = [_submit(web, KEY_B, f"batch-{i:02d}.wav") for i in range(16)]
    page = keyed_page(browser, web, KEY_B)
    page.evaluate("ids => sessionStorage.setItem('audio-analysis.followed-jobs', JSON.stringify(ids))", ids)
    page.reload()
    page.wait_for_function("n => document.querySelectorAll('.job[data-status=\"queued\"]').length === n",
                           arg=len(ids), timeout=30_000)
    start = len(page.requests.urls)
    page.wait_for_timeout(2000)
    polls = [u for u in page.requests.urls[start:] if "/jobs/" in u and u.rsplit("/", 1)[-1] in ids]
    # every 0.5 s: about 64 in 2 s; now each is read every 2 s (at most 2 each in the window)
    assert len(polls) <= 2 * len(ids), len(polls)
    assert page.errors == []
    page.close()
