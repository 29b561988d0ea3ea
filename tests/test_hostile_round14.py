"""A fourteenth round of what a hostile or careless client tried against the API, after the
earlier rounds (tests/test_hostile_*.py, test_security.py): strings the client chooses that end
up in the files the service writes.

Each test fails on the code before its fix:

* a voiceprint's label is the client's choice, and identification writes it as the speaker's
  name into RTTM, SubRip and WebVTT. Two diarized speakers could come out under one name: a
  voiceprint labelled ``SPEAKER_01`` that named diarization's SPEAKER_00 beside an unnamed
  SPEAKER_01, two voiceprints of one label, or ``Bob Smith`` and ``Bob_Smith`` (one name once
  RTTM writes spaces as ``_``). Every reader of the file (pyannote.database's RTTM loader, which
  pyannote.metrics scores with; the ``srt`` and ``webvtt-py`` packages) then read one speaker
  where the job had found two. Each diarized speaker is now written under a name of its own
  (``shared.formats._distinct_names``);
* RTTM is read with pandas by pyannote.database (what pyannote.metrics scores with), which takes
  "NA", "None", "null", "nan"... for a missing value and a field opening with ``"`` for a quoted
  one: speakers named so were read as one speaker "nan", a file named ``NA.wav`` gave an RTTM of
  which nothing was read (its uri missing), and a speaker named ``"Bob`` swallowed the next two
  lines into his name (``shared.formats._rttm_field``);
* a speaker named ``Ann--`` was written ``<v Ann-->`` in WebVTT: a cue line holding ``-->`` is a
  timing line to every WebVTT reader, so chromium showed the cue without its text and webvtt-py
  raised TypeError on the whole file;
* the web page named each speaker by its voiceprint's label as it was: two speakers named by
  voiceprints labelled alike showed two lanes, and two sets of turns, under one name, where the
  downloads now tell them apart; it now names them as the downloads do;
* a score was compared with the threshold before it was rounded to the 6 decimals it is reported
  with: ``POST /compare`` of one file twice at ``threshold=1`` answered ``similarity_score: 1.0``,
  ``threshold: 1.0``, ``same_speaker: false``, where the contract says ``same_speaker`` is
  ``similarity_score >= threshold``, and identification named nobody at a confidence it reported
  as reaching the threshold;
* a ``webhook_url`` or ``file_url`` holding Unicode's format characters (a bidi override,
  U+202E; a zero-width space) was stored and shown as sent, reading in the job's record as another
  address than the one called; it is refused (422) like whitespace and control characters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from tests.conftest import api_under_uvicorn, json_embedding_file, wait_for_job
from tests.test_formats import read_rttm, read_srt, read_vtt


# --- names in the result formats ------------------------------------------------------------------

# (speaker, identity) pairs of results whose names collided in at least one format
COLLIDING = [
    pytest.param([("SPEAKER_00", "SPEAKER_01"), ("SPEAKER_01", None)], id="a-label-that-is-another-speakers"),
    pytest.param([("SPEAKER_00", "Alex"), ("SPEAKER_01", "Alex")], id="two-voiceprints-of-one-label"),
    pytest.param([("SPEAKER_00", "Bob Smith"), ("SPEAKER_01", "Bob_Smith")], id="one-name-once-rttm-writes-it"),
    pytest.param([("SPEAKER_00", "a --> b"), ("SPEAKER_01", "a -> b")], id="one-name-once-subrip-writes-it"),
    pytest.param([("SPEAKER_00", "Bob_Smith (SPEAKER_01)"), ("SPEAKER_01", "Bob Smith"),
                  ("SPEAKER_02", "Bob_Smith")], id="a-label-that-is-the-told-apart-name"),
]


@pytest.mark.parametrize("speakers", COLLIDING)
def test_two_speakers_are_never_written_under_one_name(speakers):
    from shared.formats import to_rttm, to_srt, to_webvtt

    # each speaker speaks twice, in turn
    body = {"diarization_results": [
        {"start": float(2 * i + n * 10), "end": float(2 * i + n * 10 + 1), "speaker": speaker, "identity": identity}
        for n in range(2) for i, (speaker, identity) in enumerate(speakers)]}
    per_turn = [s["speaker"] for s in body["diarization_results"]]
    for text, read in ((to_rttm(body), read_rttm), (to_srt(body), read_srt), (to_webvtt(body), read_vtt)):
        names = {start: who for start, _, who in read(text)}
        written = [names[s["start"]] for s in body["diarization_results"]]
        # as many names as speakers, each speaker under one of them throughout
        assert len(set(written)) == len(speakers), text
        assert len(set(zip(per_turn, written))) == len(speakers), text
    # a name nobody else has is kept as it is
    assert read_srt(to_srt({"diarization_results": [
        {"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00", "identity": "Bob Smith"},
        {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_01", "identity": "Alex"},
        {"start": 2.0, "end": 3.0, "speaker": "SPEAKER_02"}]})) == [
        (0.0, 1.0, "Bob Smith"), (1.0, 2.0, "Alex"), (2.0, 3.0, "SPEAKER_02")]


@pytest.mark.parametrize("names", [
    pytest.param(["NA", "None", "null", "nan", "#N/A", "<NA>", "NULL", "n/a"], id="words-pandas-reads-as-missing"),
    pytest.param(['"Bob', '"The Rock"', "O\"Neil", "Ann"], id="fields-opening-with-a-quote"),
    pytest.param(["NA", "NA_", "NA_ (SPEAKER_01)"], id="a-name-as-another-is-written"),
])
@pytest.mark.parametrize("uri", ["meeting", "NA", "null", '"quoted name'])
def test_every_rttm_line_is_read_back_as_written(names, uri):
    from shared.formats import to_rttm

    body = {"diarization_results": [
        {"start": float(i), "end": i + 0.5, "speaker": f"SPEAKER_{i % len(names):02d}", "identity": names[i % len(names)]}
        for i in range(2 * len(names))]}
    text = to_rttm(body, uri=uri)
    read = read_rttm(text)
    assert [(start, end) for start, end, _ in read] == [(float(i), i + 0.5) for i in range(2 * len(names))], text
    assert len({who for *_, who in read}) == len(names), text
    assert all(who == line.split()[7] for (*_, who), line in zip(read, text.splitlines())), text


@pytest.mark.parametrize("name", ["Ann--", "-", "--", "a -- -", "x&#45;-", "--->"])
def test_a_name_ending_in_a_dash_keeps_its_webvtt_cue(name):
    from shared.formats import to_webvtt

    body = {"diarization_results": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00", "identity": name},
                                    {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_01"},
                                    {"start": 2.0, "end": 3.0, "speaker": "SPEAKER_00", "identity": name}]}
    text = to_webvtt(body)
    # one timing line per cue, and the voices read back as the names
    assert sum("-->" in line for line in text.splitlines()) == 3, text
    assert [who for *_, who in read_vtt(text)] == [name, "SPEAKER_01", name], text


def test_the_speaker_a_name_was_taken_from_keeps_it():
    """The unnamed speaker keeps its diarization label; the named one is told apart by its own."""
    from shared.formats import to_srt

    body = {"diarization_results": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00", "identity": "SPEAKER_01"},
                                    {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_01", "identity": None},
                                    {"start": 2.0, "end": 3.0, "speaker": "SPEAKER_02", "identity": "Alex"},
                                    {"start": 3.0, "end": 4.0, "speaker": "SPEAKER_03", "identity": "Alex"}]}
    assert [who for *_, who in read_srt(to_srt(body))] == [
        "SPEAKER_01 (SPEAKER_00)", "SPEAKER_01", "Alex", "Alex (SPEAKER_03)"]


@contextmanager
def _named_job(client, settings, audio: bytes, filename: str, labels: tuple[str, ...], seed: int) -> Iterator[dict]:
    """A two-speaker job on ``audio`` uploaded as ``filename``, its speakers named by voiceprints
    imported under ``labels`` (random vectors, at a threshold every voiceprint reaches), run by
    the worker: its finished record. The voiceprints are deleted afterwards."""
    from shared.voiceprints import embedding_model

    model = embedding_model(settings)
    rng = np.random.default_rng(seed)
    ids = []
    try:
        for label in labels:
            vector = rng.standard_normal(model.dimension)
            r = client.post("/voiceprints/import", data={"label": label, "model": model.name},
                            files={"file": ("v.json", json_embedding_file(vector / np.linalg.norm(vector)),
                                            "application/json")})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        job = client.post("/jobs/diarize", files={"file": (filename, audio, "audio/wav")},
                          data={"num_speakers": "2", "voiceprints": ",".join(ids), "identification_threshold": "-1"})
        assert job.status_code == 202, job.text
        done = wait_for_job(client, job.json()["job_id"], timeout_s=300)
        assert done["status"] == "succeeded", done
        yield done
    finally:
        for voiceprint_id in ids:
            client.delete(f"/voiceprints/{voiceprint_id}")


def test_a_job_whose_voiceprints_name_two_speakers_alike_gives_files_of_two_speakers(client, settings, sample_wav):
    """The service end to end: two voiceprints imported as "Bob Smith" and "Bob_Smith", a job on
    a two-speaker recording at a threshold every voiceprint reaches, so each names one speaker.
    Before: its RTTM was read back as one speaker ("Bob_Smith") by pyannote's loader."""
    with _named_job(client, settings, sample_wav.read_bytes(), "sample.wav", ("Bob Smith", "Bob_Smith"), 14) as done:
        assert sorted(s["identity"] for s in done["result"]["speakers"]) == ["Bob Smith", "Bob_Smith"], done["result"]
        for fmt, read in (("rttm", read_rttm), ("srt", read_srt), ("vtt", read_vtt)):
            r = client.get(f"/jobs/{done['job_id']}/result", params={"format": fmt})
            assert r.status_code == 200, r.text
            assert len({who for *_, who in read(r.text)}) == 2, r.text


# --- a decision and the score it is reported with -------------------------------------------------

def test_same_speaker_is_the_reported_score_against_the_threshold(client, sample_wav):
    """The same recording twice, at the highest threshold a client may give (this one scores just
    under 1 against itself)."""
    clip = sample_wav.read_bytes()
    r = client.post("/compare", files={"file1": ("a.wav", clip, "audio/wav"), "file2": ("b.wav", clip, "audio/wav")},
                    data={"threshold": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == 1.0 and body["similarity_score"] == 1.0, body
    assert body["same_speaker"] is True, body


def test_a_speaker_is_named_by_the_confidence_the_result_reports():
    """Two vectors of cosine 0.99999982, at threshold 1: named, since the result says 1.0."""
    from engine.pipelines import identification as ident

    class Ref:
        id, label = "vp_" + "0" * 32, "Self"

    speaker, voiceprint = np.array([[1.0, 0.0]]), np.array([[1.0, 6e-4]])
    scores = ident.score_matrix(speaker, voiceprint)
    for threshold in (1.0, np.array([1.0])):
        described = ident.describe(scores[0], ident.assign(scores, threshold)[0], [Ref()])
        assert described["confidence"] == 1.0, described
        assert described["identity"] == "Self", described
    # a score under the threshold as reported still names nobody
    described = ident.describe(scores[0], ident.assign(scores, 1.0 + 1e-6)[0], [Ref()])
    assert described["identity"] is None, described


def test_a_job_of_a_file_and_speakers_named_as_pandas_reads_missing_gives_a_readable_rttm(client, settings, sample_wav):
    """A recording uploaded as NA.wav, its two speakers named by voiceprints labelled "None" and
    '"Bob'. Before: pyannote's reader read nothing of its RTTM (every line's uri NaN)."""
    with _named_job(client, settings, sample_wav.read_bytes(), "NA.wav", ("None", '"Bob'), 41) as done:
        turns = done["result"]["diarization_results"]
        r = client.get(f"/jobs/{done['job_id']}/result", params={"format": "rttm"})
        assert r.status_code == 200, r.text
        read = read_rttm(r.text)
        assert len(read) == len(turns) and {who for *_, who in read} == {"None_", "'Bob"}, r.text


# --- the web page ---------------------------------------------------------------------------------

WEB_KEY = "round14-web-key-0123456789"


@pytest.fixture(scope="module")
def web(service_env, worker, tmp_path_factory):
    """The API under uvicorn with an API key, sending to the session worker's queue."""
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("r14web"), [WEB_KEY]) as base:
        yield base


def _import_voiceprint(base: str, label: str, dimension: int, model: str, seed: int) -> str:
    vector = np.random.default_rng(seed).standard_normal(dimension)
    r = httpx.post(f"{base}/voiceprints/import", headers={"X-API-Key": WEB_KEY}, timeout=30,
                   files={"file": ("v.json", json_embedding_file(vector / np.linalg.norm(vector)), "application/json")},
                   data={"label": label, "model": model})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Debian's chromium is not installed")
def test_the_page_names_two_speakers_alike_as_the_downloads_do(web, settings, sample_wav):
    from playwright.sync_api import sync_playwright

    from shared.voiceprints import embedding_model

    model = embedding_model(settings)
    ids = [_import_voiceprint(web, "Alex", model.dimension, model.name, seed) for seed in (1, 2)]
    job = httpx.post(f"{web}/jobs/diarize", headers={"X-API-Key": WEB_KEY}, timeout=60,
                     files={"file": ("sample.wav", sample_wav.read_bytes(), "audio/wav")},
                     data={"num_speakers": "2", "voiceprints": ",".join(ids), "identification_threshold": "-1"})
    assert job.status_code == 202, job.text
    job_id, deadline = job.json()["job_id"], time.monotonic() + 300
    while (record := httpx.get(f"{web}/jobs/{job_id}", headers={"X-API-Key": WEB_KEY}, timeout=30).json())["status"] \
            not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert record["status"] == "succeeded", record
    assert sorted(s["identity"] for s in record["result"]["speakers"]) == ["Alex", "Alex"], record["result"]
    srt = httpx.get(f"{web}/jobs/{job_id}/result", params={"format": "srt"}, headers={"X-API-Key": WEB_KEY},
                    timeout=30).text
    downloaded = {who for *_, who in read_srt(srt)}
    assert len(downloaded) == 2, srt

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(web + "/")
            page.fill("#api-key", WEB_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
            page.click(f"#recent tbody tr[data-job-id='{job_id}'] button.show")
            page.wait_for_selector("#timeline .lane")
            lanes = page.eval_on_selector_all("#timeline .lane-label", "els => els.map(e => e.textContent)")
            assert sorted(lanes) == sorted(downloaded), (lanes, downloaded)
            page.click("#turns-list summary")
            listed = set(page.eval_on_selector_all("#turns tbody tr", "rows => rows.map(r => r.cells[2].textContent)"))
            assert listed == downloaded, (listed, downloaded)
            assert errors == []
        finally:
            browser.close()


# --- invisible characters in a URL -----------------------------------------------------------------

@pytest.mark.parametrize("field", ["webhook_url", "file_url"])
@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\u2066"])
def test_a_url_with_invisible_formatting_characters_is_refused(client, sample_wav, field, char):
    """``https://example.com/\u202egro.knab`` reads as ``https://example.com/bank.org`` wherever the
    record is shown; it was taken (202) and stored as sent. Nothing is made."""
    from tests.conftest import newest_job_ids

    before = newest_job_ids(client)
    url = f"https://example.com/{char}gro.knab/a.wav"
    files = {} if field == "file_url" else {"file": ("a.wav", sample_wav.read_bytes(), "audio/wav")}
    r = client.post("/jobs/diarize", data={field: url}, files=files or None)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"detail", "error_type", "timestamp"} and "formatting characters" in r.json()["detail"]
    assert newest_job_ids(client) == before
