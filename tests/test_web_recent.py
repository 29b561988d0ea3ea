"""The web page's Recent jobs, for jobs this tab did not submit (a script's batch, another tab's
upload), in Debian's chromium driven by playwright against a real uvicorn.

The API runs in keys and queues of its own that no worker consumes, so a job stays where the test
puts it: the test moves it through running and succeeded with the same ``JobStore`` calls a
worker makes, and the page must follow without a click on "refresh".

Before: Recent jobs showed each status as it was when the list was read ("queued" for good), a
running job's step by the pipeline's name ("discrete_diarization"), and a job submitted elsewhere
could not be followed from the page (no progress, no cancel).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import tone_wav
from tests.test_web import CHROMIUM, browser, keyed_page  # noqa: F401  (the fixture, shared)

KEY = "web-recent-key-0123456789"
NAME = "web-recent"  # its keys (aa-web-recent:), queues and storage (tests.conftest.parked_api)

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (scripts/dev.sh test installs it as root: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def store(settings) -> Iterator[Any]:
    """The jobs as the API under test keeps them (its own key prefix)."""
    from tests.conftest import parked_store

    yield parked_store(settings, NAME)


@pytest.fixture(scope="module")
def web(service_env, settings, tmp_path_factory) -> Iterator[str]:
    from tests.conftest import parked_api

    with parked_api(service_env, settings, tmp_path_factory, NAME, [KEY]) as base:
        yield base


def _submit(base: str, name: str) -> str:
    """A job submitted by a script, not by the page."""
    r = httpx.post(f"{base}/jobs/diarize", files={"file": (name, tone_wav(), "audio/wav")},
                   headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_recent_jobs_keep_up_and_a_job_submitted_elsewhere_can_be_followed(web, store, browser) -> None:  # noqa: F811
    followed_id = _submit(web, "followed.wav")
    listed_id = _submit(web, "listed.wav")
    page = keyed_page(browser, web, KEY)

    def cell(job_id: str) -> str:
        return page.inner_text(f"#recent tbody tr[data-job-id='{job_id}'] td:nth-child(4)")

    page.wait_for_selector(f"#recent tbody tr[data-job-id='{listed_id}']")
    assert cell(listed_id) == "queued" and cell(followed_id) == "queued"
    assert page.query_selector(".job") is None  # the page follows none of them by itself

    # the key field losing focus with the key the page already listed with reads nothing again:
    # the lists were rebuilt under the click that took the focus away ("follow" right after
    # typing the key), and the click could land on a row no longer there (a CI run lost one so)
    def listings() -> int:
        return sum("/jobs?limit=20" in u for u in page.requests.urls)

    before = listings()
    page.locator("#api-key").blur()
    page.eval_on_selector(f"#recent tbody tr[data-job-id='{followed_id}']", "tr => tr.dataset.listed = 'before'")
    with page.expect_response(lambda r: "/jobs?limit=20" in r.url):
        page.click("#refresh")
    assert listings() == before + 1
    # the rows "refresh" drew
    followed_row = page.wait_for_selector(f"#recent tbody tr[data-job-id='{followed_id}']:not([data-listed])")

    # a worker takes both: the rows say so in words, with no click on "refresh"
    for job_id in (followed_id, listed_id):
        assert store.mark_running(job_id) is not None
        assert store.set_progress(job_id, 0.4, "discrete_diarization") is not None
    page.wait_for_function(
        "id => document.querySelector(`#recent tbody tr[data-job-id='${id}'] td:nth-child(4)`)"
        ".textContent === 'assigning turns 40 %'", arg=listed_id, timeout=15_000)

    # the row was filled in place, not replaced: a click on its way to "follow" still lands
    assert followed_row.evaluate("tr => tr.isConnected")
    page.wait_for_function(
        "tr => tr.querySelector('td:nth-child(4)').textContent === 'assigning turns 40 %'", arg=followed_row,
        timeout=15_000)

    # "follow": the job gets a row of its own above, with its progress and a cancel button
    page.click(f"#recent tbody tr[data-job-id='{followed_id}'] button.follow")
    row = page.wait_for_selector(f".job[data-job-id='{followed_id}']")
    page.wait_for_function(
        "id => document.querySelector(`.job[data-job-id='${id}'] .step`).textContent === 'assigning turns 40 %'",
        arg=followed_id, timeout=10_000)
    assert row.query_selector(".name").inner_text() == "followed.wav"
    assert row.query_selector(".cancel").is_visible()
    assert page.query_selector(f"#recent tbody tr[data-job-id='{followed_id}'] button.follow") is None

    # the followed one is cancelled from the page; the other succeeds in the worker
    row.query_selector(".cancel").click()
    result = {"diarization_results": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00"}], "processing_time": 0.1,
              "audio_duration": 1.0, "segments_count": 1, "model_device": "cpu"}
    assert store.finish(listed_id, "succeeded", result=result)[1]
    page.wait_for_function(
        "id => document.querySelector(`#recent tbody tr[data-job-id='${id}'] td:nth-child(4)`)"
        ".textContent === 'succeeded'", arg=listed_id, timeout=15_000)
    assert page.is_visible(f"#recent tbody tr[data-job-id='{listed_id}'] button:has-text('show')")
    page.wait_for_function(
        "id => document.querySelector(`#recent tbody tr[data-job-id='${id}'] td:nth-child(4)`)"
        ".textContent === 'cancelled'", arg=followed_id, timeout=15_000)
    assert store.get(followed_id).status == "cancelled"
    assert page.errors == []
    page.close()
