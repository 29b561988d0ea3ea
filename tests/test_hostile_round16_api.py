"""A sixteenth round of what a hostile or careless client (or operator) tried against the API,
after the earlier rounds (tests/test_hostile_*.py, test_security.py).

Each test fails on the code before its fix:

* a number sent as text was read as Python's ``int()``/``float()`` read it (pydantic's lax mode):
  ``num_speakers=1_0`` ran with 10 speakers, ``num_speakers=+3`` and ``num_speakers=%203`` with 3,
  ``min_duration=1_0.5`` with 10.5 s, ``threshold=+0.5`` at 0.5, and ``GET /jobs?limit=1_0``
  listed 10. Every number parameter (form or query, of every route) must now be written as plain
  digits, else 422 naming it (``shared.kinds.loose_number``, ``api.forms.refuse_loose_numbers``);
* ``min_duration=1e20`` was taken and would have dropped every segment: it is bounded by the
  longest audio the service takes (``max_audio_seconds``);
* an empty or one-character API key was taken from the configuration, and a key with a space at
  an end (which no request can match: HTTP drops it) started a service that answered that key
  401 with no sign why: the API refuses to start, naming the setting, without echoing the key;
* a part that named its file only as ``filename*=UTF-8''...`` (RFC 5987, no ``filename=``) was
  read as text (python-multipart knows a file by ``filename=`` alone), and the 422 told the client
  to add curl's ``@``; it is read as the file it is, under that name (``api.limits``), and a part
  of file content that names no file at all is told to name it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import SecretStr, ValidationError

from tests.conftest import newest_job_ids, tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _refused(r, field: str) -> dict:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS and body["error_type"] == "ValidationError", body
    assert body["detail"].startswith(f"{field}:"), body
    return body


def _audio(field: str = "file") -> list:
    return [(field, ("a.wav", tone_wav(0.5), "audio/wav"))]


TWO = [("file1", ("a.wav", tone_wav(0.5), "audio/wav")), ("file2", ("b.wav", tone_wav(0.5), "audio/wav"))]


@pytest.mark.parametrize("route, files, field, value", [
    ("/jobs/diarize", None, "num_speakers", "1_0"),      # before: 202, ran with 10 speakers
    ("/jobs/diarize", None, "num_speakers", "+3"),       # before: 202, 3
    ("/jobs/diarize", None, "max_speakers", " 3"),       # before: 202, 3
    ("/jobs/diarize", None, "min_speakers", "2.0"),      # before: 202, 2
    ("/jobs/diarize", None, "min_duration", "1_0.5"),    # before: 202, 10.5 s
    ("/diarize", None, "min_duration", "0.5 "),          # before: 200, 0.5 s (synchronous route)
    ("/jobs/compare", TWO, "threshold", "+0.5"),         # before: 202, 0.5
    ("/jobs/identify", None, "threshold", "0_5"),        # before: 422 for another reason, at best
    ("/jobs/batch", "files", "num_speakers", "1_0"),     # before: 202, a batch of 10-speaker jobs
])
def test_a_number_not_written_plainly_is_refused(client, route, files, field, value):
    before = newest_job_ids(client)
    if files is None:
        files = _audio()
    elif files == "files":
        files = _audio("files")
    extra = {"kind": "diarize"} if route == "/jobs/batch" else {}
    if route == "/jobs/identify":
        extra = {"voiceprints": "all"}
    body = _refused(client.post(route, files=files, data={field: value, **extra}), field)
    assert repr(value) in body["detail"], body
    assert newest_job_ids(client) == before


@pytest.mark.parametrize("path", ["/jobs", "/voiceprints"])
@pytest.mark.parametrize("value", ["1_0", "+5", " 5", "5.0"])
def test_a_page_size_not_written_plainly_is_refused(client, path, value):
    # before: 200 with a page of 10 (or 5)
    _refused(client.get(path, params={"limit": value}), "limit")


def test_plainly_written_numbers_are_read_as_before():
    from shared.kinds import CompareParams, DiarizeParams, loose_number

    params = DiarizeParams.model_validate({"num_speakers": "3", "min_duration": "0.25"})
    assert (params.num_speakers, params.min_duration) == (3, 0.25)
    for text in ("0.5", ".5", "1.", "5e-1", "1e+0", "-0.5", "-1E-2"):
        assert loose_number("threshold", text, float) is None, text
        CompareParams.model_validate({"threshold": text})
    for text in ("3", "003", "-3"):
        assert loose_number("num_speakers", text, int) is None, text
    for text in ("３", "٣", "1__0", "0x10", "1e1", "nan", "inf", "3\n", "\t3"):
        assert loose_number("num_speakers", text, int), text
    with pytest.raises(ValidationError, match="num_speakers: '1_0'"):
        DiarizeParams.model_validate({"num_speakers": "1_0"})


def test_a_plainly_written_number_is_still_taken(client):
    r = client.post("/jobs/diarize", files=_audio(), data={"num_speakers": "2", "min_duration": "5e-1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert client.post(f"/jobs/{job_id}/cancel").status_code in (200, 409)


@pytest.mark.parametrize("value", ["1e20", "86401", "1e308"])
def test_a_minimum_segment_longer_than_any_audio_is_refused(client, value):
    before = newest_job_ids(client)
    # before: 202, a job that would drop every segment
    body = _refused(client.post("/jobs/diarize", files=_audio(), data={"min_duration": value}), "min_duration")
    assert "longest audio" in body["detail"], body
    assert newest_job_ids(client) == before


def test_the_bound_on_min_duration_follows_the_services_audio_limit(settings):
    from shared.kinds import DiarizeParams, validate_params
    from shared.errors import InputError

    roomy = settings.model_copy(update={"max_audio_seconds": 172800.0})
    assert validate_params(DiarizeParams, {"min_duration": 100000.0}, settings=roomy).min_duration == 100000.0
    with pytest.raises(InputError, match="min_duration: .*longest audio"):
        validate_params(DiarizeParams, {"min_duration": 100000.0}, settings=settings)
    # without settings (the worker reading back what its API checked): not bounded here
    assert validate_params(DiarizeParams, {"min_duration": 100000.0}).min_duration == 100000.0


@pytest.mark.parametrize("setting, keys", [
    ("api_keys", [""]),
    ("api_keys", ["x"]),
    ("admin_api_keys", ["ab"]),
    ("api_keys", ["a-good-key-0123456789", " padded-key-0123"]),
    ("api_keys", ["clé-secrète-0123456789"]),
])
def test_a_weak_or_unmatchable_api_key_is_refused_in_the_settings(setting, keys):
    from shared.settings import Settings

    with pytest.raises(ValidationError) as caught:
        Settings(**{setting: [SecretStr(k) for k in keys]})
    said = str(caught.value)
    assert f"AUDIO_ANALYSIS_{setting.upper()}" in said
    assert all(k not in said for k in keys if len(k) > 2), said  # the key itself is never echoed


def test_the_suites_own_short_keys_and_no_keys_still_start():
    from shared.settings import Settings

    assert Settings(api_keys=[]).api_keys == []
    assert len(Settings(api_keys=[SecretStr("other"), SecretStr("s3cret")]).api_keys) == 2


def test_the_api_refuses_to_start_with_a_one_character_key(service_env):
    """Under ``python -m api.serve`` as deployed: before, it started and took ``X-API-Key: x``."""
    env = {**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")},
           "AUDIO_ANALYSIS_API_KEYS": json.dumps(["a-good-key-0123456789", "q"])}
    proc = subprocess.run([sys.executable, "-m", "api.serve", "--host", "127.0.0.1", "--port", "9"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "AUDIO_ANALYSIS_API_KEYS: key 2 of 2 has 1 characters" in proc.stderr, proc.stderr[-2000:]
    assert "a-good-key-0123456789" not in proc.stderr + proc.stdout


def _part(disposition: bytes, content: bytes) -> bytes:
    return (b"--B\r\nContent-Disposition: form-data; name=\"file\"" + disposition + b"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + content + b"\r\n--B--\r\n")


@pytest.mark.parametrize("disposition, named", [
    # before: 422 "expected an uploaded file, got text (curl sends a file with an @ ...)"
    (b"; filename*=UTF-8''r%C3%A9union.wav", "réunion.wav"),
    (b"; FILENAME*=iso-8859-1'fr'caf%E9.wav", "café.wav"),
    # before: 202 under the plain fallback, R_union.wav (RFC 6266: filename* comes first)
    (b"; filename=\"R_union.wav\"; filename*=UTF-8''r%C3%A9union.wav", "réunion.wav"),
    (b"; filename*=hex''abc.wav", "abc.wav"),  # a codec that is no text encoding: read as UTF-8
])
def test_a_file_named_by_filename_star_is_read_as_that_file(client, disposition, named):
    r = client.post("/jobs/diarize", content=_part(disposition, tone_wav(0.5)),
                    headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["filename"] == named, job
    assert client.post(f"/jobs/{job['job_id']}/cancel").status_code in (200, 409)


def test_a_part_of_file_content_without_a_file_name_is_told_to_name_it(client):
    before = newest_job_ids(client)
    for disposition in (b"", b"; filename*=not-rfc-5987"):
        r = client.post("/jobs/diarize", content=_part(disposition, tone_wav(0.5)),
                        headers={"Content-Type": "multipart/form-data; boundary=B"})
        detail = _refused(r, "file")["detail"]
        # before: only "curl sends a file with an @", which such a client was not using
        assert "without a file name" in detail and 'filename="..."' in detail, detail
    # text typed where the file goes (curl -F file=meeting.wav) is still told about curl's @
    typed = _refused(client.post("/jobs/diarize", files=[("file", (None, "meeting.wav"))]), "file")["detail"]
    assert "without a file name" not in typed and "-F 'file=@meeting.wav'" in typed, typed
    assert newest_job_ids(client) == before


@pytest.mark.parametrize("route, files, data, named", [
    ("/jobs/diarize", None, {"Num_Speakers": "3"}, "num_speakers"),       # before: 202, the default count
    ("/jobs/diarize", None, {"num-speakers": "3"}, "num_speakers"),       # before: 202, the default count
    ("/diarize", None, {"Min_Duration": "1"}, "min_duration"),            # before: 200, nothing dropped
    ("/jobs/compare", TWO, {"THRESHOLD": "0.9"}, "threshold"),            # before: 202, the default threshold
    ("/jobs/diarize", [("file", ("a.wav", tone_wav(0.5), "audio/wav")), ("FILE", ("b.wav", tone_wav(0.5), "audio/wav"))],
     {}, "file"),                                                          # before: 202, the second upload dropped
    ("/voiceprints", [("files", ("a.wav", tone_wav(0.5), "audio/wav"))], {"label": "Ann", "Label": "Bob"}, "label"),
])
def test_a_field_misspelt_by_its_case_or_a_dash_is_refused_not_dropped(client, route, files, data, named):
    before = newest_job_ids(client)
    r = client.post(route, files=files or _audio(), data=data)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS and body["error_type"] == "ValidationError", body
    assert f"(the field is {named})" in body["detail"], body
    assert newest_job_ids(client) == before


def test_a_field_misspelt_in_the_query_string_is_refused(client):
    before = newest_job_ids(client)
    r = client.post("/jobs/diarize?Num_Speakers=3", files=_audio())
    # before: 202, the default speaker count
    _refused(r, "Num_Speakers")
    assert newest_job_ids(client) == before


def test_two_api_keys_in_one_request_are_refused(variant_app):
    key_a, key_b = "round16-key-a-0123456789", "round16-key-b-0123456789"
    secured = variant_app(api_keys=[SecretStr(key_a), SecretStr(key_b)])
    both = [("X-API-Key", key_b), ("X-API-Key", key_a)]
    for r in (secured.get("/jobs", headers=both), secured.get("/voiceprints", headers=both),
              secured.post("/jobs/diarize", files=_audio(), headers=both)):
        # before: 200/202, served as the first key's tenant
        assert r.status_code == 401, r.text
        body = r.json()
        assert set(body) == ERROR_KEYS and "X-API-Key given 2 times" in body["detail"], body
    assert secured.get("/jobs", headers={"X-API-Key": key_a}).status_code == 200


def _export(**changes) -> bytes:
    from shared.settings import Settings
    from shared.voiceprints import FORMAT, embedding_model

    document = {"format": FORMAT, "label": "Ann R16", "model": embedding_model(Settings()).name,
                "dimension": 192, "embedding": [1.0] + [0.0] * 191, **changes}
    return json.dumps(document).encode()


@pytest.mark.parametrize("data, said", [
    # before: 201, a voiceprint of another version's document stored as a v1 one
    (_export(format="audio-analysis/voiceprint-v2"), "format: 'audio-analysis/voiceprint-v2'"),
    (_export(format=7), "format: not a string"),
    # before: 201, stored as "Bob" (the last), where another reader of the file takes "Ann R16"
    (_export()[:-1] + b', "label": "Bob"}', "names 'label' more than once"),
])
def test_an_import_of_another_format_or_a_key_named_twice_is_refused(client, data, said):
    before = [vp["id"] for vp in client.get("/voiceprints", params={"limit": 1000}).json()["voiceprints"]]
    r = client.post("/voiceprints/import", files=[("file", ("ann.json", data, "application/json"))])
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS and body["error_type"] == "ValidationError" and said in body["detail"], body
    after = [vp["id"] for vp in client.get("/voiceprints", params={"limit": 1000}).json()["voiceprints"]]
    assert after == before


def test_an_export_and_a_hand_written_document_are_still_imported(client):
    exported = client.post("/voiceprints/import", files=[("file", ("ann.json", _export(), "application/json"))])
    assert exported.status_code == 201, exported.text
    vp_id = exported.json()["id"]
    again = client.get(f"/voiceprints/{vp_id}/export")
    assert again.status_code == 200
    roundtrip = client.post("/voiceprints/import", files=[("file", ("again.json", again.content, "application/json"))])
    assert roundtrip.status_code == 201, roundtrip.text
    document = json.loads(_export())
    del document["format"]
    written = client.post("/voiceprints/import",
                          files=[("file", ("hand.json", json.dumps(document).encode(), "application/json"))])
    assert written.status_code == 201, written.text
    for made in (vp_id, roundtrip.json()["id"], written.json()["id"]):
        assert client.delete(f"/voiceprints/{made}").status_code == 204


@pytest.mark.parametrize("document, form", [
    ({"label": "Ann", "model": "<b>" + "x" * 60_000}, {}),                # a model name of 60 KB in the file
    ({"label": "Ann"}, {"model": "<script>" + "x" * 60_000}),             # or in the form
    ({"label": "Ann", "model": "<b>" + "x" * 60_000}, {"model": "other"}),  # the two told apart
])
def test_an_imports_model_name_is_not_echoed_whole(client, document, form):
    data = json.dumps({**document, "embedding": [1.0] + [0.0] * 191}).encode()
    r = client.post("/voiceprints/import", files=[("file", ("v.json", data, "application/json"))], data=form)
    assert r.status_code == 422, r.text[:300]
    body = r.json()
    assert set(body) == ERROR_KEYS and body["detail"].startswith(("model:", "voiceprint was made with")), body
    # before: the whole name, 60 KB of it, came back in the answer
    assert len(r.content) < 1000, len(r.content)
    assert "60003 characters" in body["detail"] or "60008 characters" in body["detail"], body


@pytest.mark.parametrize("label, plain, own", [
    ("李雷", None, "%E6%9D%8E%E9%9B%B7"),             # before: saved as vp_<id>.json, the name lost
    ("Zoë Ørsted", "Zo_rsted", "Zo%C3%AB%20%C3%98rsted"),  # before: Zo_rsted.json
    ('Ann "A/B"; x', "Ann_A_B_x", "Ann%20%22A_B%22%3B%20x"),
])
def test_an_exported_voiceprint_is_named_after_its_person(client, label, plain, own):
    from email.message import Message

    from werkzeug.http import parse_options_header

    imported = client.post("/voiceprints/import", files=[("file", ("p.json", _export(label=label), "application/json"))])
    assert imported.status_code == 201, imported.text
    vp_id = imported.json()["id"]
    for fmt, suffix in (("json", ".json"), ("npy", ".npy")):
        r = client.get(f"/voiceprints/{vp_id}/export", params={"format": fmt})
        assert r.status_code == 200
        header = r.headers["content-disposition"]
        assert f"filename*=UTF-8''{own}{suffix}" in header, header
        assert f'filename="{plain or vp_id}{suffix}"' in header, header
        # read back as a browser does (werkzeug prefers filename*, as browsers do), and the plain one
        assert header.isascii() and "\r" not in header and "\n" not in header, header
        assert parse_options_header(header) == ("attachment", {"filename": label.replace("/", "_") + suffix})
        parsed = Message()
        parsed["content-disposition"] = header
        assert parsed.get_param("filename", header="content-disposition") == f"{plain or vp_id}{suffix}"
    assert client.delete(f"/voiceprints/{vp_id}").status_code == 204


@pytest.mark.parametrize("path, params, named", [
    ("/jobs", {"Status": "failed"}, "status"),      # before: 200, every job listed as if failed
    ("/jobs", {"LIMIT": "5"}, "limit"),             # before: 200, a page of 20
    ("/jobs", {"kind ": "diarize"}, "kind"),
    ("/voiceprints", {"Limit": "5"}, "limit"),
])
def test_a_query_parameter_misspelt_by_its_case_is_refused(client, path, params, named):
    r = client.get(path, params=params)
    assert r.status_code == 422, r.text[:300]
    body = r.json()
    assert set(body) == ERROR_KEYS and f"(the query parameter is {named})" in body["detail"], body


def test_query_parameters_no_route_reads_are_still_left_alone(client):
    # a tracker's or a proxy's, and a form field's name on a route that has no such parameter
    for params in ({"utm_source": "x"}, {"File": "x"}, {"_": "1"}):
        assert client.get("/jobs", params=params).status_code == 200, params


@pytest.mark.parametrize("data, ok", [
    ({"num_speakers": "2", "min_speakers": "5"}, False),   # before: 202, ran with 2, the 5 dropped
    ({"num_speakers": "4", "max_speakers": "3"}, False),   # before: 202, ran with 4
    ({"num_speakers": "2", "min_speakers": "1", "max_speakers": "3"}, True),
])
def test_num_speakers_outside_the_bounds_sent_with_it_is_refused(data, ok):
    from shared.errors import InputError
    from shared.kinds import DiarizeParams, validate_params

    if ok:
        assert validate_params(DiarizeParams, data).num_speakers == int(data["num_speakers"])
        return
    with pytest.raises(InputError, match=r"^num_speakers: \d is outside (min|max)_speakers"):
        validate_params(DiarizeParams, data)


def test_num_speakers_outside_its_bounds_is_a_422_before_a_job(client):
    before = newest_job_ids(client)
    body = _refused(client.post("/jobs/diarize", files=_audio(), data={"num_speakers": "2", "min_speakers": "5"}),
                    "num_speakers")
    assert "outside min_speakers (5)" in body["detail"], body
    assert newest_job_ids(client) == before
