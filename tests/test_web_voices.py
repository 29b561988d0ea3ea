"""The web page's two questions about voices, in Debian's chromium driven by playwright, against a
real uvicorn, the session's real worker and real speech (../shared/data utterances, 2-3 s each):
are two recordings the same person (a ``compare`` job), and whose voice is this among the key's
voiceprints (an ``identify`` job). Users had to go to /docs for both.

One API under uvicorn (its own key, so ``voiceprints=all`` is this module's alone); each test a
fresh page, so its own sessionStorage, as a new tab has.
"""

from __future__ import annotations

import os
from typing import Iterator

import httpx
import pytest

from tests.conftest import api_under_uvicorn
from tests.test_web import CHROMIUM, browser, keyed_page  # noqa: F401  (the fixture, shared)

KEY = "web-voices-key-0123456789"
# a label as users type them, with markup in it: shown as text, never parsed
LABEL = "Alice <b>Ng</b>"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (scripts/dev.sh test installs it as root: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def web(service_env, worker, tmp_path_factory) -> Iterator[str]:
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("web-voices"), [KEY]) as base:
        yield base


def _page(browser, base: str, width: int = 1280, height: int = 900):  # noqa: F811
    return keyed_page(browser, base, KEY, width, height)


def _record(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()


def _answered(page, panel: str, before: str | None) -> str:
    """The id of the job whose answer the panel shows, once it shows another than ``before``."""
    page.wait_for_function(
        "([sel, before]) => { const a = document.querySelector(sel); "
        "return !a.hidden && a.dataset.jobId && a.dataset.jobId !== before; }",
        arg=[panel, before or ""], timeout=120_000)
    return page.get_attribute(panel, "data-job-id")


def _unlabelled(page, panel: str) -> list[str]:
    return page.eval_on_selector_all(
        f"{panel} input, {panel} button",
        "els => els.filter(e => e.tagName === 'INPUT' ? e.labels.length === 0 : !e.textContent.trim())"
        ".map(e => e.outerHTML)")


def test_compare_two_voices_same_and_different(web, browser, utterances, tmp_path) -> None:  # noqa: F811
    page = _page(browser, web)
    assert _unlabelled(page, "#compare-panel") == []
    sent = []
    page.route("**/jobs/compare", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))

    # a threshold out of range: the API's 422, in its words, in the panel; no job
    one, two, three = utterances["spk1"][2], utterances["spk1"][3], utterances["spk2"][0]
    page.set_input_files("#cmp-file1", str(one))
    page.set_input_files("#cmp-file2", str(two))
    page.fill("#cmp-threshold", "5")
    page.click("#cmp-submit")
    page.wait_for_function("() => document.querySelector('#cmp-error').textContent.includes('422')")
    assert "threshold" in page.text_content("#cmp-error")
    assert page.locator("#jobs .job").count() == 0

    # one talker twice, submitted from the keyboard: same speaker, with the score and threshold
    page.fill("#cmp-threshold", "")
    page.focus("#cmp-submit")
    page.keyboard.press("Enter")
    job_id = _answered(page, "#cmp-answer", None)
    result = _record(web, job_id)["result"]
    assert result["same_speaker"] is True
    assert page.get_attribute("#cmp-answer", "data-verdict") == "same"
    assert page.text_content("#cmp-answer .verdict") == "Same speaker"
    assert page.text_content("#cmp-answer .score") == f"{result['similarity_score']:.3f}"
    assert page.text_content("#cmp-answer .threshold") == f"{result['threshold']:.3f}"
    assert f"{one.name} and {two.name}" in page.text_content("#cmp-answer")
    # followed like any job: its row, done
    row = page.locator(f"#jobs .job[data-job-id='{job_id}']")
    assert row.get_attribute("data-status") == "succeeded"
    assert b'name="file1"' in sent[-1] and b'name="file2"' in sent[-1] and b'name="threshold"' not in sent[-1]
    # the fields were emptied for the next pair
    assert page.eval_on_selector("#cmp-file1", "e => e.files.length") == 0

    # two talkers, with the threshold given: different speakers, judged against that threshold
    page.set_input_files("#cmp-file1", str(one))
    page.set_input_files("#cmp-file2", str(three))
    page.fill("#cmp-threshold", "0.3")
    page.click("#cmp-submit")
    other_id = _answered(page, "#cmp-answer", job_id)
    result = _record(web, other_id)["result"]
    assert result["same_speaker"] is False and result["threshold"] == 0.3
    assert page.get_attribute("#cmp-answer", "data-verdict") == "different"
    assert page.text_content("#cmp-answer .verdict") == "Different speakers"
    assert page.text_content("#cmp-answer .score") == f"{result['similarity_score']:.3f}"
    assert page.text_content("#cmp-answer .threshold") == "0.300"

    # a reload follows both again, named after both files; the answer is shown when asked for
    page.reload()
    row = page.wait_for_selector(f"#jobs .job[data-job-id='{job_id}'][data-status='succeeded']")
    assert row.query_selector(".name").inner_text() == f"{one.name} and {two.name}"
    assert page.is_hidden("#cmp-answer")
    row.query_selector(".show").click()
    page.wait_for_function(f"() => document.querySelector('#cmp-answer').dataset.jobId === '{job_id}'")
    assert page.text_content("#cmp-answer .verdict") == "Same speaker"
    # and from Recent jobs, which knows the job only by its summary
    page.click("#refresh")
    page.locator(f"#recent tr[data-job-id='{other_id}'] button", has_text="show").click()
    page.wait_for_function(f"() => document.querySelector('#cmp-answer').dataset.jobId === '{other_id}'")
    assert page.text_content("#cmp-answer .verdict") == "Different speakers"
    page.locator("#compare-panel").screenshot(path=str(tmp_path / "compare.png"))
    print(f"\nscreenshot {tmp_path / 'compare.png'}")
    assert page.errors == [] and page.requests.outside(web) == []  # type: ignore[attr-defined]
    page.close()


def test_identify_names_an_enrolled_voice_and_no_one_else(web, browser, utterances, tmp_path) -> None:  # noqa: F811
    enrolled = httpx.post(f"{web}/voiceprints", headers={"X-API-Key": KEY}, data={"label": LABEL},
                          files=[("files", (p.name, p.read_bytes(), "audio/wav")) for p in utterances["spk1"][:2]],
                          timeout=120)
    assert enrolled.status_code == 201, enrolled.text
    vp_id = enrolled.json()["id"]
    # on a phone, where the panel must fit too
    page = _page(browser, web, 375, 740)
    assert _unlabelled(page, "#identify-panel") == []
    sent = []
    page.route("**/jobs/identify", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))
    # a locator: the list is drawn again with each listing (the key's change asks for one)
    choice = page.locator(f"#id-voiceprints input[value='{vp_id}']")
    choice.wait_for()
    assert page.text_content("#id-voiceprints label").strip() == LABEL  # as text: no <b> made of it
    assert page.locator("#id-voiceprints b").count() == 0

    # among all the key's voiceprints: the enrolled talker, by name
    page.set_input_files("#id-file", str(utterances["spk1"][4]))
    page.click("#id-submit")
    job_id = _answered(page, "#id-answer", None)
    result = _record(web, job_id)["result"]
    assert result["identity"] == LABEL and result["voiceprint_id"] == vp_id
    assert page.get_attribute("#id-answer", "data-verdict") == "named"
    assert page.text_content("#id-answer .verdict") == LABEL
    assert page.locator("#id-answer b.score").text_content() == f"{result['confidence']:.3f}"
    assert page.text_content("#id-answer .threshold") == f"{result['threshold']:.3f}"
    assert b"\r\n\r\nall\r\n" in sent[-1]
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375

    # only the ones ticked, none ticked: said in the page, nothing sent
    page.check("input[name='id-among'][value='some']")
    page.set_input_files("#id-file", str(utterances["spk2"][1]))
    page.click("#id-submit")
    assert "tick at least one" in page.text_content("#id-error") and len(sent) == 1
    # a talker nobody enrolled, against the one ticked (from the keyboard): no match
    choice.focus()
    page.keyboard.press("Space")
    assert choice.is_checked()
    page.click("#id-submit")
    other_id = _answered(page, "#id-answer", job_id)
    result = _record(web, other_id)["result"]
    assert result["identity"] is None and result["confidence"] < result["threshold"]
    assert f"\r\n\r\n{vp_id}\r\n".encode() in sent[-1]
    assert page.get_attribute("#id-answer", "data-verdict") == "nobody"
    assert page.text_content("#id-answer .verdict") == "Nobody enrolled matched"
    assert page.text_content("#id-answer .score") == f"{result['confidence']:.3f}"
    assert page.text_content("#id-error") == ""
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    page.locator("#identify-panel").screenshot(path=str(tmp_path / "identify.png"))
    print(f"\nscreenshot {tmp_path / 'identify.png'}")
    assert page.errors == [] and page.requests.outside(web) == []  # type: ignore[attr-defined]
    page.close()
    httpx.delete(f"{web}/voiceprints/{vp_id}", headers={"X-API-Key": KEY}, timeout=10)
