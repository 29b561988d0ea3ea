"""The web page as its users work it, in Debian's chromium driven by playwright, against a real
uvicorn and the session's real worker: what a keyboard user, a phone, an impatient double-click,
a reload in the middle of a job and a result shown without its audio each ran into.

One API under uvicorn (its own key), the session worker; each test a fresh browser context, so its
own sessionStorage, as a new tab has.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import api_under_uvicorn
from tests.test_web import CHROMIUM, browser, keyed_page  # noqa: F401  (the fixture, shared)

KEY = "web-trial-key-0123456789"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (scripts/dev.sh test installs it as root: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def web(service_env, worker, tmp_path_factory) -> Iterator[str]:
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("web-trial"), [KEY]) as base:
        yield base


def _page(browser, base: str, width: int = 1280, height: int = 900):  # noqa: F811
    return keyed_page(browser, base, KEY, width, height)


def _jobs(base: str) -> list[dict]:
    return httpx.get(f"{base}/jobs", params={"limit": 100}, headers={"X-API-Key": KEY}, timeout=10).json()["jobs"]


def test_keyboard_opens_the_file_picker_and_the_page_fits_a_phone(web, browser, short_sample) -> None:  # noqa: F811
    page = _page(browser, web)
    # listening from the start: playwright turns the browser's interception of file choosers on
    # as a listener is added, and a key pressed before that opens no chooser it can see
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.wait_for_timeout(200)
    # from the key field, Tab reaches the file picker and Space opens it: the input was `hidden`,
    # out of the tab order, and the drop zone took focus but did nothing with a key
    page.focus("#api-key")
    for _ in range(4):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "files":
            break
    assert page.evaluate("() => document.activeElement.id") == "files"
    # the focused picker shows it has the focus (its label is outlined)
    outline = page.eval_on_selector("#drop label", "e => getComputedStyle(e).outlineStyle")
    assert outline != "none", outline
    page.keyboard.press("Space")
    page.wait_for_timeout(50)
    deadline = time.monotonic() + 10
    while not choosers and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert len(choosers) == 1 and choosers[0].is_multiple()
    choosers[0].set_files(str(short_sample))
    assert page.text_content("#picked") == short_sample.name
    assert page.is_enabled("#submit")
    # the URL field is wide enough to read what is typed (all .options inputs were 5rem wide)
    assert page.eval_on_selector("#audio-url", "e => e.getBoundingClientRect().width") > 400
    page.close()

    phone = _page(browser, web, 375, 740)
    phone.wait_for_timeout(300)
    # nothing wider than the screen: the header pushed the page to 417 px, sideways scrolling
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= 375
    assert phone.errors == []  # type: ignore[attr-defined]
    phone.close()


def test_one_job_per_click_and_a_reload_keeps_following_it(web, browser, slow_sample) -> None:  # noqa: F811
    before = {j["job_id"] for j in _jobs(web)}
    page = _page(browser, web)
    held = []
    # the upload is held in the browser, as a big file on a slow line would be
    page.route("**/jobs/diarize", lambda route: held.append(route))
    page.set_input_files("#files", str(slow_sample))
    page.click("#submit")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert len(held) == 1
    # while it uploads, Submit is off and a second click sends nothing (it sent the file again)
    page.click("#submit", force=True)
    page.wait_for_timeout(500)
    assert len(held) == 1, "a second click sent the file again"
    assert page.is_disabled("#submit") and "uploading" in page.text_content("#submit-status")
    held[0].continue_()
    page.wait_for_selector(".job[data-job-id]")
    page.wait_for_function("() => document.querySelector('#submit-status').textContent === ''")
    new = [j for j in _jobs(web) if j["job_id"] not in before]
    assert len(new) == 1, new
    job_id = new[0]["job_id"]

    # a reload mid-job: the job is followed again, with its progress and its cancel button (the
    # page had forgotten it; Recent jobs showed a line that never changed and could not cancel)
    page.unroute("**/jobs/diarize")
    page.reload()
    row = page.wait_for_selector(f".job[data-job-id='{job_id}']", timeout=10_000)
    assert row.query_selector(".name").inner_text() == slow_sample.name
    cancel = row.query_selector(".cancel")
    page.wait_for_function(f"() => !document.querySelector(\".job[data-job-id='{job_id}'] .cancel\").hidden")
    cancel.click()
    page.wait_for_selector(f".job[data-job-id='{job_id}'][data-status='cancelled']", timeout=60_000)
    record = httpx.get(f"{web}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()
    assert record["status"] == "cancelled"
    assert page.errors == []  # type: ignore[attr-defined]
    page.close()


def test_options_webvtt_and_a_reloaded_result_plays_its_recording(web, browser, short_sample,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    page = _page(browser, web)
    sent = []
    page.route("**/jobs/diarize", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))
    page.set_input_files("#files", str(short_sample))
    page.check("#exclusive")
    page.fill("#num-speakers", "2")
    page.click("#submit")
    row = page.wait_for_selector(".job[data-status='succeeded']", timeout=240_000)
    job_id = row.get_attribute("data-job-id")
    assert len(sent) == 1 and b'name="exclusive"' in sent[0] and b'name="num_speakers"' in sent[0]
    page.wait_for_selector("#timeline .lane")
    # WebVTT, which the API renders, downloads as the other formats do
    with page.expect_download() as download:
        page.click(".downloads button[data-format='vtt']")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"{short_sample.stem}.vtt"
    expected = httpx.get(f"{web}/jobs/{job_id}/result", params={"format": "vtt"},
                         headers={"X-API-Key": KEY}, timeout=10).text
    assert saved.read_text() == expected and expected.startswith("WEBVTT")

    # after a reload the finished job is listed again, not drawn over the page by itself; shown,
    # it has no audio, and the recording opened in the result panel plays with the timeline (the
    # hint sent the user to the picker above, which queued the file for a new job instead)
    page.reload()
    row = page.wait_for_selector(f".job[data-job-id='{job_id}'][data-status='succeeded']")
    assert page.is_hidden("#result-panel")
    row.query_selector(".show").click()
    page.wait_for_selector("#timeline .lane")
    assert page.is_visible("#no-audio")
    page.set_input_files("#play-file", str(short_sample))
    assert page.is_hidden("#no-audio")
    assert page.is_disabled("#submit") and page.text_content("#picked") == ""
    turn = page.locator("#timeline .turn").nth(1)
    start = float(turn.get_attribute("data-start"))
    turn.click()
    page.wait_for_function(f"() => document.querySelector('#audio').currentTime >= {start - 0.05}")
    assert page.evaluate("document.querySelector('#audio').src").startswith("blob:")

    # the turns, one a line, from the keyboard: the timeline's bars could not be reached without a
    # mouse. Tab from the list's summary opens it; the last turn's button plays that turn
    result = httpx.get(f"{web}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()["result"]
    turns = sorted(result["diarization_results"], key=lambda t: (t["start"], t["end"]))
    page.focus("#turns-list summary")
    page.keyboard.press("Enter")
    rows = page.locator("#turns tbody tr")
    assert rows.count() == len(turns)
    assert rows.last.locator("td").nth(2).inner_text() == turns[-1]["speaker"]
    page.evaluate("() => document.querySelector('#audio').pause()")
    rows.last.locator("button").focus()
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#audio').currentTime >= {turns[-1]['start'] - 0.05}")
    assert page.errors == []  # type: ignore[attr-defined]
    page.close()
