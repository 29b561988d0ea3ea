"""A twelfth round of what a hostile client tried against the API, after the earlier rounds
(tests/test_hostile_*.py, test_security.py, test_tenant_quota.py, test_idempotency.py), against a
real uvicorn (``python -m api.serve``) on the session's Redis, with queues nobody consumes.

Each test fails on the code before its fix:

* the web page at ``/`` is served under a Content-Security-Policy (this origin's scripts only,
  no other host to connect to), but the same page was also served as ``/ui/index.html`` (and
  ``/ui/index.html/``) without any: a link to it ran the page with none of the policy's limits;
* an embedding pickle (``/compare_embedding``, ``/jobs/compare_embedding``, which take the
  clients' historical pickles through a restricted unpickler) of 9 bytes, ``LONG_BINPUT
  100000000``, made the API's peak memory go from 113 MB to 1.68 GB and took 0.9 s of its CPU
  before the 422: CPython's C unpickler grows its memo array to twice any index a PUT names, and
  zero-fills it. An index of 2**30 asked for 16 GB a request; a few at once, and the host's OOM
  killer took the API;
* an embedding pickle of a dict (or a set) whose 40,000 keys are integers that hash alike
  (multiples of 2**61 - 1; 519 KB) held the C unpickler, and with it the GIL and every request of
  the API, 10.8 s (a thread beside it ran twice instead of 1,076 times); the pickle was refused
  only once built ("not dict"). With pickle's Python unpickler (the fix above) the same took
  7.5 s of a pool thread, and so did a protocol-0 ``PUT`` naming such integers as memo indices.
  A pickle is now refused from its opcodes, before anything is built, when it builds a dict or a
  set (no pickled vector does) or memoises past its own length (no pickler does);
* a form field sent in the query string of a route that takes a form was dropped without a word,
  as round 8 found for a field of another route in the form: ``POST
  /jobs/diarize?num_speakers=3&webhook_url=...`` with the file as a form part was answered 202
  for a job that ran with the default speaker count and sent no webhook, and ``POST
  /voiceprints/import?label=Bob`` stored the file's own label (201);
* a voiceprint label, or an upload's file name, of Hangul fillers or blank Braille alone
  (``"\u3164"``, ``"\uffa0"``, ``"\u2800\u2800"``: letters and a symbol drawn as nothing) passed
  the check rounds 6 and 7 added for names with nothing visible, and was stored (201, 202) and
  shown as a blank name: an empty cell on the page, a blank speaker in subtitles;
* no answer of the API said whether it could be cached: what a request with an ``X-API-Key`` is
  answered depends on the key (``GET /jobs`` and ``GET /voiceprints`` list that key's own at one
  URL for every key; ``GET /health`` names the workers' hosts to a key only; an export is a
  person's voiceprint), and a shared cache in front of the API (Varnish keeps a GET's 200 two
  minutes by default, whatever its X-API-Key) answered the next caller of the URL, another
  tenant or nobody, with the first one's.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from shared.embedding_file import load_embedding
from shared.errors import InputError
from tests.conftest import newest_job_ids, tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}
KEY = "round12-key-0123456789"
NAME = "round12"  # its keys (aa-round12:), queues and storage (tests.conftest.parked_api)


@pytest.fixture(scope="module")
def api(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn (api.serve) with an API key, in keys and queues of its own:
    an httpx client with the key, and the server's process (``client.server``)."""
    import httpx

    from tests.conftest import parked_api

    with parked_api(service_env, settings, tmp_path_factory, NAME, [KEY]) as base, \
            httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60) as client:
        port = base.rsplit(":", 1)[1]
        client.server = next(p for p in psutil.Process().children(recursive=True)  # type: ignore[attr-defined]
                             if "api.serve" in " ".join(p.cmdline()) and port in p.cmdline())
        yield client


def _assert_documented(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    return body


# --- the page's policy, wherever the page is served ----------------------------------------------
@pytest.mark.parametrize("path", ["/ui/index.html", "/ui/index.html/"])
def test_the_page_served_as_a_file_keeps_its_content_security_policy(api, path: str) -> None:
    page = api.get("/")
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    same = api.get(path)
    assert same.status_code == 200 and same.content == page.content  # the page itself
    assert same.headers.get("Content-Security-Policy") == policy
    # the page's own files keep working under it, and the docs' assets keep theirs
    assert api.get("/ui/app.js").status_code == 200
    assert api.get("/docs-assets/swagger-ui.css").status_code == 200


# --- an embedding pickle naming a far memo slot --------------------------------------------------
def _far_put(index: int, how: str) -> bytes:
    """A pickle of an empty list memoised at ``index``: ``LONG_BINPUT`` (protocol 1+) or the
    text ``PUT`` of protocol 0."""
    if how == "long_binput":
        return b"\x80\x02]r" + struct.pack("<I", index) + b"."
    return b"(lp" + str(index).encode() + b"\n."


@pytest.mark.parametrize("how", ["long_binput", "put"])
def test_a_pickle_naming_a_far_memo_slot_costs_no_memory(how: str) -> None:
    """20,000,000: the C unpickler's memo grew to 40,000,000 slots, 320 MB zero-filled, for a
    file of 9 bytes (and 2**32 - 1 is the most LONG_BINPUT names)."""
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as refused:
            load_embedding(_far_put(20_000_000, how), "e.pkl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status_code == 422
    assert "memo index" in refused.value.detail
    assert peak < 20 * 1024 * 1024, f"{peak / 2**20:.0f} MB for a pickle of {len(_far_put(20_000_000, how))} bytes"


def _colliding(n: int, how: str) -> bytes:
    """A pickle of ``n`` integers that hash alike (k * (2**61 - 1)): the keys of a dict
    (``SETITEMS``), the members of a set (``ADDITEMS``), or the memo indices of ``PUT``s."""
    body = bytearray({"setitems": b"\x80\x02}(", "additems": b"\x80\x04\x8f(", "put": b"(l"}[how])
    for k in range(1, n + 1):
        value = k * (2**61 - 1)
        if how == "put":
            body += b"p" + str(value).encode() + b"\n"
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            body += b"\x8a" + bytes([len(raw)]) + raw + (b"N" if how == "setitems" else b"")
    return bytes(body + {"setitems": b"u.", "additems": b"\x90.", "put": b"."}[how])


@pytest.mark.parametrize("how,why", [("setitems", "a mapping or a set"), ("additems", "a mapping or a set"),
                                     ("put", "memo index")])
def test_a_pickle_of_keys_that_hash_alike_is_refused_before_it_is_built(how: str, why: str) -> None:
    """20,000 keys: 1.7 s of CPU each way before (quadratic: 40,000 took 7.5 s), and refused
    only afterwards, as "not dict", "not set" or an empty vector."""
    with pytest.raises(InputError) as refused:
        load_embedding(_colliding(20_000, how), "e.pkl")
    assert refused.value.status_code == 422
    assert why in refused.value.detail


def test_the_pickles_clients_keep_still_read() -> None:
    import pickle

    import numpy as np

    vector = np.random.default_rng(2).standard_normal(192)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for value in (vector.tolist(), tuple(vector.tolist()), vector.astype(np.float32), vector,
                      vector.astype(">f8"), [np.float32(x) for x in vector]):
            np.testing.assert_allclose(load_embedding(pickle.dumps(value, protocol=protocol), "e.pkl"),
                                       np.asarray(vector, dtype=np.float32), rtol=1e-6)


def _peak_rss(process: psutil.Process) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_the_api_refuses_such_an_embedding_without_taking_the_memory(api) -> None:
    server: psutil.Process = api.server
    if not Path(f"/proc/{server.pid}/status").exists():
        pytest.skip("reads the server's peak memory from Linux's /proc")
    try:  # the peak counted from now: 5 into clear_refs resets VmHWM to the current RSS
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")
    except OSError:
        pass  # the peak so far then: the pickle's 320 MB still shows above it
    before = _peak_rss(server)
    bomb = _far_put(20_000_000, "long_binput")
    for path in ("/jobs/compare_embedding", "/compare_embedding"):
        r = api.post(path, files={"audio": ("a.wav", tone_wav(), "audio/wav"), "embedding": ("e.pkl", bomb)})
        assert "memo index" in _assert_documented(r, 422)["detail"]
    grown = _peak_rss(server) - before
    assert grown < 100 * 1024 * 1024, f"the API's peak memory grew {grown / 2**20:.0f} MB for {len(bomb)} bytes"
    # nor the CPU: keys that hash alike are refused from the pickle's opcodes
    r = api.post("/jobs/compare_embedding", files={"audio": ("a.wav", tone_wav(), "audio/wav"),
                                                   "embedding": ("e.pkl", _colliding(20_000, "setitems"))})
    assert "a mapping or a set" in _assert_documented(r, 422)["detail"]
    # the pickles clients keep still read
    import pickle

    import numpy as np

    vector = np.random.default_rng(0).standard_normal(192).astype(np.float32)
    for data in (pickle.dumps(vector.tolist(), protocol=0), pickle.dumps(vector, protocol=2),
                 pickle.dumps(vector, protocol=5)):
        np.testing.assert_array_equal(load_embedding(data, "e.pkl"), vector)


# --- answers that depend on the key, and caches in front of the API -------------------------------
def test_what_a_key_is_answered_is_kept_by_no_cache(api) -> None:
    import numpy as np

    from shared.voiceprints import EMBEDDING_MODELS

    vector = np.random.default_rng(1).standard_normal(192).tolist()
    imported = api.post("/voiceprints/import", files={"file": ("v.json", str(vector).encode())},
                        data={"label": "Ann", "model": EMBEDDING_MODELS["embedded"].name})
    assert imported.status_code == 201, imported.text
    job = api.post("/jobs/diarize", files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert job.status_code == 202, job.text
    job_id, vp = job.json()["job_id"], imported.json()["id"]
    for path in ("/jobs", f"/jobs/{job_id}", f"/batches/{'0' * 32}", "/voiceprints", f"/voiceprints/{vp}",
                 f"/voiceprints/{vp}/export", f"/voiceprints/{vp}/export?format=npy", "/health"):
        r = api.get(path)
        assert r.status_code in (200, 404), (path, r.text)
        assert r.headers.get("Cache-Control") == "no-store", (path, r.headers)
    for method, path in (("HEAD", "/jobs"), ("POST", f"/jobs/{job_id}/cancel")):
        assert api.request(method, path).headers.get("Cache-Control") == "no-store", (method, path)
    # what a route says itself stands (the secret: no-store already; the page: no-cache), and what
    # is the same for everyone, asked without a key, is left to the caches
    assert api.get("/webhooks/secret").headers["Cache-Control"] == "no-store"
    assert api.get("/").headers["Cache-Control"] == "no-cache"
    import httpx

    with httpx.Client(base_url=str(api.base_url), timeout=30) as anonymous:
        for path in ("/ui/app.js", "/health", "/openapi.json"):
            r = anonymous.get(path)
            assert r.status_code == 200 and "no-store" not in r.headers.get("Cache-Control", ""), path


# --- form fields sent in the URL -------------------------------------------------------------------
@pytest.mark.parametrize("path,query,files,form", [
    # with the form that goes with it (``form``), as a client that put the rest in the URL sends it
    ("/jobs/diarize", {"num_speakers": "3", "webhook_url": "http://127.0.0.1:9/hook"}, ("file",), {}),
    ("/jobs/compare", {"threshold": "0.9"}, ("file1", "file2"), {}),
    ("/jobs/batch", {"num_speakers": "2"}, ("files",), {"kind": "diarize"}),
    ("/diarize", {"exclusive": "true"}, ("file",), {}),
    # a field of another route, in this one's URL, as in its form (tests/test_hostile_round8_api.py)
    ("/jobs/embedding", {"num_speakers": "2"}, ("file",), {}),
])
def test_a_form_field_in_the_query_string_is_refused_not_dropped(api, path: str, query: dict[str, str],
                                                                files: tuple[str, ...], form: dict[str, str]) -> None:
    before = newest_job_ids(api)
    uploads = [(name, (f"{name}.wav", tone_wav(), "audio/wav")) for name in files]
    r = api.post(path, params=query, files=uploads, data=form)
    detail = _assert_documented(r, 422)["detail"]
    assert detail.startswith(f"{', '.join(sorted(query))}: sent in the query string"), detail
    assert newest_job_ids(api) == before  # nothing queued
    # without them, the request is taken, and a name no route reads stays free in the URL
    ok = api.post(path, params={"trace": "1"}, files=uploads, data=form)
    assert ok.status_code in (202, 503), ok.text  # /diarize waits for a worker: none runs here


def test_a_voiceprint_label_in_the_query_string_is_refused_not_replaced(api) -> None:
    from shared.voiceprints import EMBEDDING_MODELS

    document = {"label": "Ann", "model": EMBEDDING_MODELS["embedded"].name, "embedding": [0.1] * 192}
    upload = {"file": ("v.json", json.dumps(document).encode())}
    r = api.post("/voiceprints/import", params={"label": "Bob"}, files=upload)
    assert _assert_documented(r, 422)["detail"].startswith("label: sent in the query string")
    ok = api.post("/voiceprints/import", data={"label": "Bob"}, files=upload)
    assert ok.status_code == 201 and ok.json()["label"] == "Bob", ok.text


# --- names drawn as nothing ----------------------------------------------------------------------
BLANK_NAMES = {"hangul_filler": "\u3164", "halfwidth_hangul_filler": "\uffa0", "choseong_jungseong": "\u115f\u1160",
               "braille_blank": "\u2800\u2800", "with_spaces": "\u3164 \u2800"}


@pytest.mark.parametrize("label", list(BLANK_NAMES.values()), ids=list(BLANK_NAMES))
def test_a_label_drawn_as_nothing_is_refused_at_import_and_enrolment(api, label: str) -> None:
    from shared.voiceprints import EMBEDDING_MODELS

    document = {"label": label, "model": EMBEDDING_MODELS["embedded"].name, "embedding": [0.1] * 192}
    r = api.post("/voiceprints/import", files={"file": ("v.json", json.dumps(document).encode())})
    assert "visible character" in _assert_documented(r, 422)["detail"]
    # an enrolment job, refused at the edge before any worker embeds its files
    r = api.post("/jobs/enroll", files={"files": ("a.wav", tone_wav(), "audio/wav")}, data={"label": label})
    assert "visible character" in _assert_documented(r, 422)["detail"]


@pytest.mark.parametrize("name", list(BLANK_NAMES.values()), ids=list(BLANK_NAMES))
def test_an_upload_named_with_what_is_drawn_as_nothing_has_no_file_name(api, name: str) -> None:
    r = api.post("/jobs/diarize", files={"file": (name, tone_wav(), "audio/wav")})
    assert r.status_code == 202 and r.json()["filename"] is None, r.text


def test_names_in_hangul_and_braille_are_still_names() -> None:
    from shared.formats import file_name
    from shared.voiceprints import clean_label

    for name in ("\ud55c\uad6d\uc5b4", "\u2801\u2803", "Ann \u2800", "\u3164\ud55c"):
        # a Hangul filler before everything modifies nothing and is drawn as nothing: a label is
        # stored without it (round 17, shared.voiceprints._without_invisible), still a name
        assert clean_label(name) == ("\ud55c" if name == "\u3164\ud55c" else name)
        assert file_name(name) == name
