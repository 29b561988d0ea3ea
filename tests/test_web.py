"""The web page and the API docs in a real browser: Debian's chromium, headless, driven by
playwright, against a real uvicorn, the session's real worker and pyannote's sample.

Every request the browser makes is recorded: none may leave 127.0.0.1 (no CDN, no fonts, no
telemetry), for the page and for /docs and /redoc alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import api_under_uvicorn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "web-page-key-0123456789"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (scripts/dev.sh test installs it as root: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def web(service_env, worker, tmp_path_factory) -> Iterator[str]:
    """The API under uvicorn with API keys on, sending to the session worker's queue."""
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("web"), [KEY]) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # the flags keep chromium from calling Google's hosts, which this network refuses
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--autoplay-policy=no-user-gesture-required",
        ])
        yield b
        b.close()


class Requests:
    """What a page asked for, and what the page's Content-Security-Policy stopped in the browser
    (ReDoc links its logo from its CDN: refused by the policy before any connection)."""

    def __init__(self, page) -> None:
        self.urls: list[str] = []
        self.blocked: set[str] = set()
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("requestfailed", lambda request: request.failure == "csp" and self.blocked.add(request.url))

    def outside(self, base: str) -> list[str]:
        own = urlsplit(base).netloc
        return [u for u in self.urls
                if urlsplit(u).scheme not in ("blob", "data") and urlsplit(u).netloc != own and u not in self.blocked]


def keyed_page(browser, base: str, key: str, width: int = 1280, height: int = 900):  # noqa: F811
    """The page in a new tab of ``width`` x ``height`` with ``key`` typed in, as a user starts:
    its uncaught errors in ``page.errors``, what it asked for in ``page.requests``."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.requests = Requests(page)  # type: ignore[attr-defined]
    page.goto(base + "/")
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _recorded(page) -> Requests:
    return Requests(page)


def _outside(requests: Requests, base: str) -> list[str]:
    return requests.outside(base)


def test_upload_shows_the_timeline_the_api_computed(web, browser, sample_wav, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    urls = _recorded(page)
    started = time.perf_counter()
    page.goto(web + "/")
    page.wait_for_load_state("load")
    load_s = time.perf_counter() - started
    # without the key the service says so, in the page
    page.wait_for_selector("#recent .error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.set_input_files("#files", str(sample_wav))
    page.click("#submit")
    page.wait_for_selector(".job[data-status='succeeded']", timeout=300_000)
    page.wait_for_selector("#timeline .lane")
    job_id = page.get_attribute(".job", "data-job-id")

    result = httpx.get(f"{web}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()["result"]
    speakers = sorted({t["speaker"] for t in result["diarization_results"]})
    lanes = page.eval_on_selector_all("#timeline .lane", "els => els.map(e => e.dataset.speaker)")
    assert sorted(lanes) == speakers and len(lanes) == 2
    assert page.locator("#timeline .turn").count() == result["segments_count"]
    # the turns sit where the API put them, on the timeline's own scale
    first = result["diarization_results"][0]
    duration = max(result["audio_duration"], max(t["end"] for t in result["diarization_results"]))
    placed = page.eval_on_selector_all(
        "#timeline .turn", "els => els.map(e => [parseFloat(e.style.left) / e.parentElement.clientWidth, "
        "parseFloat(e.dataset.start)])")
    assert len(placed) == result["segments_count"]
    for fraction, start in placed:
        assert abs(fraction - start / duration) < 0.01, (fraction, start)

    # clicking a turn plays the user's own file from that turn's start
    turn = page.locator(f"#timeline .lane[data-speaker='{first['speaker']}'] .turn").first
    turn.click()
    page.wait_for_function(f"() => document.querySelector('#audio').currentTime >= {first['start'] - 0.05}")
    assert page.evaluate("document.querySelector('#audio').src").startswith("blob:")
    # zoom widens the tracks
    before = page.eval_on_selector("#timeline .track", "e => e.getBoundingClientRect().width")
    page.fill("#zoom", "4")
    page.dispatch_event("#zoom", "input")
    after = page.eval_on_selector("#timeline .track", "e => e.getBoundingClientRect().width")
    assert after > 3 * before
    page.fill("#zoom", "1")
    page.dispatch_event("#zoom", "input")
    # the download buttons give what the API gives for the same job, under the file's own name
    for fmt in ("json", "rttm", "srt"):
        with page.expect_download() as download:
            page.click(f".downloads button[data-format='{fmt}']")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name == f"{sample_wav.stem}.{fmt}", saved.name
        if fmt == "json":
            assert json.loads(saved.read_text()) == result
        else:
            expected = httpx.get(f"{web}/jobs/{job_id}/result", params={"format": fmt},
                                 headers={"X-API-Key": KEY}, timeout=10).text
            assert saved.read_text() == expected and expected.strip(), (fmt, expected[:200])
    assert saved.read_text().count(" --> ") == result["segments_count"]  # one SRT cue per turn
    # the recent-jobs table is the key's own list
    page.click("#refresh")
    page.wait_for_selector(f"#recent tbody tr >> text=succeeded")

    shot = tmp_path / "timeline.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("AUDIO_ANALYSIS_SCREENSHOTS"):
        # refreshes the README's picture: AUDIO_ANALYSIS_SCREENSHOTS=1 scripts/dev.sh test tests/test_web.py
        shutil.copyfile(shot, ROOT / "docs" / "web-timeline.png")
    print(f"\nweb page: loaded in {load_s * 1000:.0f} ms; {len(lanes)} lanes, "
          f"{result['segments_count']} turns; screenshot {shot}")
    # a fresh page knows the job only from that list, which carries no result (GET /jobs is a
    # summary): its "show" fetches the record and draws the same timeline, without the audio
    page.reload()
    page.wait_for_selector("#recent tbody tr >> text=succeeded")
    assert page.locator("#timeline .lane").count() == 0
    asked = len(urls.urls)
    page.locator("#recent tbody button", has_text="show").first.click()
    page.wait_for_selector("#timeline .lane")
    assert f"{web}/jobs/{job_id}" in urls.urls[asked:], urls.urls[asked:]
    assert sorted(page.eval_on_selector_all("#timeline .lane", "els => els.map(e => e.dataset.speaker)")) == speakers
    assert page.locator("#timeline .turn").count() == result["segments_count"]
    assert page.is_visible("#no-audio") and page.text_content("#submit-error") == ""
    assert _outside(urls, web) == []
    page.close()


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .info"), ("/redoc", "redoc-wrap, .redoc-wrap")])
def test_api_docs_render_offline(web, browser, path, ready) -> None:
    page = browser.new_page()
    urls = _recorded(page)
    page.goto(web + path)
    page.wait_for_selector(ready, timeout=30_000)
    assert "audio-analysis" in page.content()
    assert _outside(urls, web) == []
    page.close()


def test_no_page_references_another_host(web) -> None:
    own = urlsplit(web).netloc
    for path in ("/", "/docs", "/redoc"):
        html = httpx.get(web + path, timeout=10).text
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        assert refs, path
        foreign = [r for r in refs if urlsplit(r).netloc not in ("", own) and not r.startswith(("data:", "blob:"))]
        assert foreign == [], (path, foreign)
    csp = httpx.get(web + "/", timeout=10).headers["content-security-policy"]
    assert "default-src 'self'" in csp


def test_enroll_list_and_delete_a_voiceprint_from_the_page(web, browser, utterances) -> None:
    page = browser.new_page()
    requests = _recorded(page)
    page.goto(web + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#vp-label", "Alice")
    page.set_input_files("#vp-files", [str(p) for p in utterances["spk1"][:2]])
    page.click("#vp-enroll")
    row = page.wait_for_selector("#voiceprints tbody tr[data-voiceprint-id]", timeout=240_000)
    cells = row.query_selector_all("td")
    assert cells[0].inner_text() == "Alice" and cells[2].inner_text() == "2"
    listed = httpx.get(f"{web}/voiceprints", headers={"X-API-Key": KEY}, timeout=10).json()["voiceprints"]
    assert [v["label"] for v in listed] == ["Alice"]
    # deleting asks first (it cannot be undone), naming the person; declined, nothing is deleted
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    row.query_selector("button").click()
    page.wait_for_timeout(500)
    assert asked and "Alice" in asked[0], asked
    assert len(httpx.get(f"{web}/voiceprints", headers={"X-API-Key": KEY}, timeout=10).json()["voiceprints"]) == 1
    assert page.query_selector("#voiceprints tbody tr[data-voiceprint-id]") is not None
    page.once("dialog", lambda d: d.accept())
    row.query_selector("button").click()
    # function form: a bare expression would go through eval, which the page's policy refuses
    page.wait_for_function("() => document.querySelectorAll('#voiceprints tbody tr[data-voiceprint-id]').length === 0")
    assert httpx.get(f"{web}/voiceprints", headers={"X-API-Key": KEY}, timeout=10).json()["voiceprints"] == []
    assert _outside(requests, web) == []
    page.close()
