"""The documentation followed literally, as a new integrator does: README.md, docs/service.md,
the OpenAPI document the API serves, ``audio-analysis --help`` and its commands' help.

Each test fails on the code (or the docs) before its fix:

* docs/service.md's audio-by-URL example, ``curl -X POST …/jobs/diarize --data-urlencode
  'file_url=…' -F num_speakers=2``, mixed an urlencoded body with a multipart one: curl refuses
  that ("You can only select one HTTP request method!", exit 2) and sends nothing. The example,
  run as written against a real API, is now answered 202 with ``num_speakers`` received.
* the OpenAPI document (``/docs``, ``/openapi.json``) showed ``label`` of ``POST /jobs/enroll``
  and ``voiceprints`` of ``POST /identify`` and ``/jobs/identify`` as optional: a request made as
  it described was refused 422 ("label: Field required"). They are now in the body's
  ``required`` list, and the API still answers their absence in the documented error body. The
  CLI's ``enroll`` and ``identify`` likewise showed ``--label`` and ``--voiceprints`` without
  ``[required]``; left out, the command imported torch and then printed "ValidationError:
  voiceprints: Field required"; now typer's "Missing option '--voiceprints'", before anything loads.
  ``submit --kind enroll`` without ``--label`` uploaded its files to be told "label: Field
  required" by the API; it now says "needs --label" (exit 2) before sending anything.
* ``audio-analysis up`` with its API's port held by another program (port 8000 is a common one)
  started Redis and the workers, loaded the models, took the other program's listening port for
  its own API's ("the API is up", then "audio-analysis is up: web page http://127.0.0.1:8000/"),
  stopped as its API exited ("address already in use") and exited 0. It now refuses at once, exit
  1, naming the port and the option or setting that moves it, and starts nothing; a child that
  exits by itself makes ``up`` exit 1 too (Ctrl-C still 0).
* the Python client (``Client.submit("identify", "a.wav", voiceprints=[id1, id2])``) sent a list
  as its Python text, ``['vp_…', 'vp_…']``, and the API refused it naming a voiceprint
  ``"['vp_…'"``; a list of ids is now sent as the ids separated by commas, as the API reads them.
* the production profile (README, "Models") without its weights, as a first run has it, failed
  with "pyannote/speaker-diarization-3.1 is not in the model directory and the hub is offline":
  no directory was set, and nothing said how to give one. It now names AUDIO_ANALYSIS_MODEL_DIR,
  ``scripts/fetch_models.py`` and the hub's token (still no path: /health shows the load error).
* ``audio-analysis submit``/``status``/``result``/``cancel`` with no API where they looked said
  "cannot reach the API (ConnectError): [Errno 111] Connection refused": not where it looked
  (http://127.0.0.1:8000 by default, whatever port ``up`` was given) nor how to name another.
  It now names the URL, and --url / AUDIO_ANALYSIS_URL; and the 15 s of retries before it (4,
  waiting 1, 2, 4, 8 s), which passed in silence, say each what happened and when the next is.
* docs/service.md and docs/models.md sent a reader to ``engine.core.DEFAULT_THRESHOLDS`` for the
  calibrated thresholds: no such name (they are each profile's ``default_threshold`` in
  ``engine/profiles.py``). Every dotted name and file path the docs give in backticks now
  exists; the CLI's and /docs' ``threshold`` help names the embedded default (0.45) besides
  ECAPA's 0.25, and the identification example shows the calibrated 0.5, not 0.45.
* /docs' "Try it out" (Swagger UI) filled every optional form field with a sample of its type
  and sent it: ``POST /jobs/diarize`` with a file and nothing else went out with
  ``file_url=string``, ``num_speakers=0``, ``webhook_url=string``, ``voiceprints=string`` ... and
  was refused 422 ("file: give either an upload or file_url, not both"); ``POST
  /voiceprints/import`` with an export went out with ``label=string&model=string`` and was
  refused for a model "string". Optional form fields are now documented with an empty example:
  "Try it out" leaves them empty and the request is what the user filled in (202, 201).
* /docs offered no file input for a field of several uploads (``files`` of /jobs/batch,
  /jobs/enroll, /voiceprints): text boxes prefilled with random characters, sent as text and
  refused 422 ("files.0: Value error, Expected UploadFile, received: <class 'str'>"), so none of
  the three could be tried there. Their items are now documented ``format: binary`` (OpenAPI
  3.1's ``contentMediaType`` alone Swagger UI reads for a single upload only): a file input per
  item, and a batch of two files tried in /docs is answered 202 with two jobs.
* curl's most common slip, ``-F file=meeting.wav`` (the ``@`` that sends the file left out), was
  answered "file: Value error, Expected UploadFile, received: <class 'str'>", pydantic's words
  about the API's internals; now "file: expected an uploaded file, got text (curl sends a file
  with an @: -F 'file=@meeting.wav')", on every route and upload field alike.
* a JSON body (``{"file_url": "https://…", "num_speakers": 2}``, what most HTTP APIs take) sent
  to ``POST /jobs/diarize`` was read as an empty form: 422 "file: an upload (or file_url) is
  required", though it held a file_url; audio sent as the body itself (``--data-binary
  @meeting.wav``) the same. Such a body is now 415, naming what was sent and what the route takes.
* ``up``'s data folder (``.data``: the webhook secret, Flower's login, the mark of its Redis
  database) was relative to the working directory: ``.venv/bin/audio-analysis up`` started
  outside the checkout made new secrets there and, its database marked with that folder, took
  another Redis database, in which the voiceprints and jobs of earlier runs were not. The
  default folder is now the checkout's ``.data`` wherever ``up`` starts; one the environment
  names is taken as given.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.test_web import CHROMIUM, browser  # noqa: F401  (the fixture, shared)

ROOT = Path(__file__).resolve().parents[1]
NAME = "docs-trial"  # its keys (aa-docs-trial:), queues and storage (tests.conftest.parked_api)
PREFIX = f"aa-{NAME}"


@pytest.fixture(scope="module")
def api_base(service_env, settings, tmp_path_factory) -> Iterator[str]:
    """The API under a real uvicorn (api.serve), without API keys as `up` runs it, in keys and
    queues of its own: its base URL."""
    from tests.conftest import parked_api

    with parked_api(service_env, settings, tmp_path_factory, NAME, []) as base:
        yield base


def _record(redis_client, job_id: str) -> dict[str, Any]:
    raw = redis_client.get(f"{PREFIX}:job:{job_id}")
    assert raw is not None, job_id
    return json.loads(raw)


def _code_block_after(doc: Path, marker: str) -> str:
    """The first fenced code block after ``marker`` in ``doc``."""
    text = doc.read_text()
    start = text.index(marker)
    found = re.search(r"```[a-z]*\n(.*?)```", text[start:], re.S)
    assert found, marker
    return found.group(1)


# --- names the docs point at ----------------------------------------------------------------------

DOCS = ["README.md", "docs/service.md", "docs/models.md", "docs/scaling.md", "docs/architecture.md"]


def test_every_code_name_the_docs_give_exists():
    """`shared.webhooks.verify`, `engine/lanes.py` ...: a reader looks them up."""
    import importlib

    missing = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for dotted in set(re.findall(r"`((?:shared|engine|api|worker|cli|evaluation)(?:\.[A-Za-z_]\w*)+)", text)):
            if dotted.endswith((".py", ".md", ".yaml", ".yml", ".json")):
                continue
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    found: Any = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for name in parts[cut:]:
                    found = getattr(found, name, None)
                break
            if found is None:
                missing.append((doc, dotted))
        for path in set(re.findall(r"`((?:shared|engine|api|worker|cli|evaluation|bench|scripts|tests|deploy|docker)"
                                   r"/[\w./-]+\.(?:py|sh|yaml|yml|json))", text)):
            if not (ROOT / path).exists():
                missing.append((doc, path))
    # before: engine.core.DEFAULT_THRESHOLDS, in docs/service.md and docs/models.md
    assert not missing, missing


def test_the_threshold_help_names_the_default_of_each_profile():
    from engine.profiles import EMBEDDED, PRODUCTION
    from shared.kinds import KINDS

    text = KINDS["compare"].form_fields["threshold"].description
    assert f"{EMBEDDED.default_threshold} for the embedded" in text, text
    assert f"{PRODUCTION.default_threshold} for the production" in text, text
    service = (ROOT / "docs" / "service.md").read_text()
    assert f'"identification": {{"threshold": {EMBEDDED.identification_threshold}, ' in service


# --- docs/service.md, Audio by URL ----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented example is a curl command")
def test_the_audio_by_url_curl_example_runs_as_written(api_base, redis_client):
    block = _code_block_after(ROOT / "docs" / "service.md", "or, with no file at all, urlencoded:")
    assert "curl" in block, block
    # the example as written, at this API, naming a URL the policy of the test session allows
    # (a bucket's host would need DNS)
    command = block.replace("http://127.0.0.1:8000", api_base).replace(
        "https://bucket.s3.eu-west-1.amazonaws.com/meeting.wav", "http://127.0.0.1:8081/meeting.wav")
    # its trailing comment dropped, so that curl's own options can follow
    command = re.sub(r"\s+#[^\n]*", "", command.strip())
    run = subprocess.run(["bash", "-c", command + " -sS -w '\\n%{http_code}'"], capture_output=True, text=True,
                         timeout=60)
    # before: curl exit 2, "You can only select one HTTP request method!", nothing sent
    assert run.returncode == 0, (run.returncode, run.stderr)
    body, status = run.stdout.rsplit("\n", 1)
    assert status == "202", (status, body)
    job = json.loads(body)
    assert job["filename"] == "meeting.wav" and job["status"] == "queued", job
    assert _record(redis_client, job["job_id"])["_params"]["num_speakers"] == 2


# --- the OpenAPI document and the CLI's help: required fields ------------------------------------

REQUIRED = [("/jobs/enroll", "label"), ("/identify", "voiceprints"), ("/jobs/identify", "voiceprints"),
            ("/voiceprints", "label")]


@pytest.mark.parametrize("path,name", REQUIRED)
def test_the_openapi_document_says_which_fields_a_route_requires(api_base, path, name):
    import httpx

    document = httpx.get(f"{api_base}/openapi.json", timeout=30).json()
    body = document["paths"][path]["post"]["requestBody"]["content"]
    ref = next(iter(body.values()))["schema"]["$ref"].rsplit("/", 1)[1]
    schema = document["components"]["schemas"][ref]
    # before: only the uploads were listed (or nothing, where the upload may be a URL instead)
    assert name in (schema.get("required") or []), (path, schema.get("required"))


def test_a_field_optional_elsewhere_stays_optional(api_base):
    """diarize's voiceprints are optional (identification is an extra), the batch's fields are
    every batch kind's (identify's voiceprints with kind=diarize would be refused), and a job
    route's upload may be a URL instead."""
    import httpx

    document = httpx.get(f"{api_base}/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]

    def required(path: str) -> list[str]:
        body = document["paths"][path]["post"]["requestBody"]["content"]
        return schemas[next(iter(body.values()))["schema"]["$ref"].rsplit("/", 1)[1]].get("required") or []

    assert required("/diarize") == ["file"]
    assert required("/jobs/diarize") == []
    assert sorted(required("/jobs/batch")) == ["files", "kind"]


@pytest.mark.parametrize("path,field,files", [
    ("/jobs/enroll", "label", [("files", "a.wav")]),
    ("/identify", "voiceprints", [("file", "a.wav")]),
    ("/jobs/identify", "voiceprints", [("file", "a.wav")]),
])
def test_a_required_field_left_out_is_a_documented_422(api_base, path, field, files):
    import httpx

    from tests.conftest import tone_wav

    upload = [(name, (filename, tone_wav(), "audio/wav")) for name, filename in files]
    r = httpx.post(f"{api_base}{path}", files=upload, timeout=60)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"detail", "error_type", "timestamp"} and body["error_type"] == "ValidationError", body
    assert body["detail"] == f"{field}: Field required", body


@pytest.mark.parametrize("command,option", [("enroll", "--label"), ("identify", "--voiceprints")])
def test_the_cli_says_which_options_a_command_requires(tmp_path, command, option):
    from typer.testing import CliRunner

    from cli.main import app
    from tests.conftest import tone_wav

    help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
    line = next(line for line in help_text.splitlines() if option + " " in line)
    assert "[required]" in line, line
    audio = tmp_path / "a.wav"
    audio.write_bytes(tone_wav())
    ran = subprocess.run([sys.executable, "-m", "cli.main", command, str(audio)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    # before: exit 2 with "ValidationError: ... Field required", once torch had been imported
    assert ran.returncode == 2, (ran.returncode, ran.stderr)
    assert f"Missing option '{option}'" in ran.stderr, ran.stderr
    assert "torch" not in ran.stderr


@pytest.mark.parametrize("kind,option", [("enroll", "--label"), ("identify", "--voiceprints")])
def test_submit_names_an_option_its_kind_needs_before_sending(tmp_path, kind, option):
    from cli.launcher import free_port
    from tests.conftest import tone_wav

    audio = tmp_path / "a.wav"
    audio.write_bytes(tone_wav())
    # nothing listens there: had it sent the files, it would have retried for 15 s, then exit 1
    ran = subprocess.run([sys.executable, "-m", "cli.main", "submit", "--kind", kind, str(audio),
                          "--url", f"http://127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    said = " ".join(ran.stderr.split())
    assert ran.returncode == 2, (ran.returncode, said)
    assert f"submit --kind {kind}: needs {option}" in said, said


def test_submit_takes_the_options_of_its_kind_only():
    """`submit` offers every kind's options: none of them is required there (a diarization
    needs no --label)."""
    from typer.testing import CliRunner

    from cli.main import app

    help_text = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--label", "--voiceprints"):
        line = next(line for line in help_text.splitlines() if option + " " in line)
        assert "[required]" not in line, line


# --- audio-analysis up ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["api", "flower"])
def test_up_refuses_a_port_another_program_holds(tmp_path, which):
    import os
    import socket
    import time

    from cli.launcher import free_port

    holder = socket.create_server(("127.0.0.1", 0))
    held = holder.getsockname()[1]
    api_port, flower_port = (held, free_port()) if which == "api" else (free_port(), held)
    env = {**os.environ, "AUDIO_ANALYSIS_API_PORT": str(api_port), "AUDIO_ANALYSIS_FLOWER_PORT": str(flower_port),
           # nothing listens there: had `up` gone on, it would have started a redis-server here
           "REDIS_URL": "redis://127.0.0.1:1/0", "AUDIO_ANALYSIS_REDIS_URL": "redis://127.0.0.1:1/0",
           "AUDIO_ANALYSIS_DATA_DIR": str(tmp_path / "data"), "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "up")}
    started = time.monotonic()
    try:
        ran = subprocess.run([sys.executable, "-m", "cli.main", "up"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    finally:
        holder.close()
    took = time.monotonic() - started
    out = ran.stdout + ran.stderr
    # before: exit 0 after "audio-analysis is up", its models loaded, its API gone
    assert ran.returncode == 1, (ran.returncode, out[-2000:])
    assert f"port {held} on 127.0.0.1 is in use" in out, out[-2000:]
    setting = "AUDIO_ANALYSIS_API_PORT" if which == "api" else "AUDIO_ANALYSIS_FLOWER_PORT"
    assert setting in out, out
    # nothing was started: no Redis of its own, no worker (whose models take seconds to load)
    assert "is up" not in out and not (tmp_path / "data" / "redis").exists(), out[-2000:]
    assert took < 30, took


def test_up_keeps_its_data_in_the_checkout_wherever_it_starts(tmp_path, monkeypatch):
    from cli import launcher
    from shared.settings import Settings

    seen = {}

    class Stop(Exception):
        pass

    def ensure_redis(self, url, data_dir):
        seen["redis"] = data_dir
        raise Stop

    monkeypatch.delenv("AUDIO_ANALYSIS_DATA_DIR", raising=False)
    monkeypatch.setattr(launcher, "taken_ports", lambda settings, with_flower: [])
    monkeypatch.setattr(launcher.Stack, "ensure_redis", ensure_redis)
    monkeypatch.chdir(tmp_path)  # started from another folder
    with pytest.raises(Stop):
        launcher.run_local(Settings(), with_flower=False, console=None)
    # before: tmp_path/.data/redis, and a database marked with tmp_path/.data
    assert seen["redis"] == ROOT / ".data" / "redis"
    assert not (tmp_path / ".data").exists()
    # a folder the environment names is kept as given, relative or not
    monkeypatch.setenv("AUDIO_ANALYSIS_DATA_DIR", "mine")
    assert launcher.anchored_data_dir(Settings()).data_dir == Path("mine")


def test_up_checks_a_port_as_its_servers_bind():
    """A port free to bind is not taken, even with a connection of its own waiting out TIME_WAIT;
    a listening one is."""
    import socket

    from cli.launcher import free_port, port_taken

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port)) as c:
            conn, _ = server.accept()
            conn.close()  # the server side closes first: its end waits out TIME_WAIT
            c.recv(1)
    assert not port_taken("127.0.0.1", port)
    assert not port_taken("127.0.0.1", free_port())


def test_an_api_the_cli_cannot_reach_is_named_with_how_to_name_another(capsys):
    import httpx
    import typer

    from cli.service import _exit_for

    refused = httpx.ConnectError("[Errno 111] Connection refused")
    exit_ = _exit_for(refused, "http://127.0.0.1:8000")
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 1
    said = " ".join(capsys.readouterr().err.split())
    # before: "cannot reach the API (ConnectError): [Errno 111] Connection refused"
    assert "cannot reach the API at http://127.0.0.1:8000 (ConnectError)" in said, said
    assert "--url or AUDIO_ANALYSIS_URL" in said, said


@pytest.mark.parametrize("path,field,fields", [
    ("/diarize", "file", {}),
    ("/jobs/diarize", "file", {}),
    ("/jobs/batch", "files.0", {"kind": "diarize"}),
    ("/voiceprints", "files.0", {"label": "Ada"}),
    ("/jobs/compare_embedding", "embedding", {"audio_url": "http://127.0.0.1:8081/a.wav"}),
])
def test_text_where_a_file_goes_says_how_to_send_the_file(api_base, path, field, fields):
    import httpx

    name = field.split(".")[0]
    # as curl -F file=meeting.wav sends it: a form field of text, multipart
    parts = [(name, (None, "meeting.wav"))] + [(k, (None, v)) for k, v in fields.items()]
    r = httpx.post(f"{api_base}{path}", files=parts, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    # before: "file: Value error, Expected UploadFile, received: <class 'str'>"
    assert detail == (f"{field}: expected an uploaded file, got text (curl sends a file with an @: "
                      f"-F '{name}=@meeting.wav')"), detail


@pytest.mark.parametrize("path,content_type,body", [
    ("/jobs/diarize", "application/json", b'{"file_url": "http://127.0.0.1:8081/a.wav", "num_speakers": 2}'),
    ("/jobs/diarize", "audio/wav", None),
    ("/diarize", "audio/wav", None),
    ("/voiceprints/import", "application/json", b'{"label": "Ada", "embedding": [1.0]}'),
])
def test_a_body_that_is_not_a_form_is_named(api_base, path, content_type, body):
    import httpx

    from tests.conftest import tone_wav

    r = httpx.post(f"{api_base}{path}", content=body if body is not None else tone_wav(),
                   headers={"Content-Type": content_type}, timeout=30)
    # before: 422 "file: an upload (or file_url) is required" (or "file: Field required")
    assert r.status_code == 415, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"POST {path} takes a form (multipart/form-data") and f"not {content_type}" in detail


def test_forms_are_taken_as_before(api_base):
    """Multipart with its boundary, and urlencoded without a file, still reach the route."""
    import httpx

    from tests.conftest import tone_wav

    r = httpx.post(f"{api_base}/jobs/diarize", files={"file": ("a.wav", tone_wav(2.0), "audio/wav")}, timeout=30)
    assert r.status_code == 202, r.text
    r = httpx.post(f"{api_base}/jobs/diarize", data={"file_url": "http://127.0.0.1:8081/a.wav"}, timeout=30)
    assert r.status_code == 202, r.text
    # no Content-Type (nothing sent): the form's own answer
    r = httpx.post(f"{api_base}/jobs/diarize", timeout=30)
    assert r.status_code == 422 and r.json()["detail"] == "file: an upload (or file_url) is required", r.text


def test_the_cli_says_it_retries_an_api_that_does_not_answer(monkeypatch):
    from typer.testing import CliRunner

    from cli import client as client_module
    from cli.launcher import free_port
    from cli.main import app

    waited = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)
    url = f"http://127.0.0.1:{free_port()}"
    ran = CliRunner().invoke(app, ["status", "0123", "--url", url], env={"COLUMNS": "300"})
    assert ran.exit_code == 1, ran.output
    said = [line for line in ran.output.splitlines() if "retry" in line]
    # before: nothing for 15 s, then "cannot reach the API"
    assert waited == [1, 2, 4, 8], waited
    assert len(said) == 4 and all(line.startswith(f"the API at {url}: no answer (ConnectError") for line in said), said
    assert said[-1].endswith("retry 4 of 4 in 8 s"), said


# --- the Python client ----------------------------------------------------------------------------

def test_the_client_sends_a_list_of_voiceprint_ids_as_the_api_reads_it(api_base, settings, redis_client, tmp_path):
    import httpx

    from cli.client import Client
    from shared.errors import InputError
    from shared.voiceprints import embedding_model
    from tests.conftest import json_embedding_file, tone_wav

    model = embedding_model(settings)
    ids = []
    for i, label in enumerate(("Alice", "Bob")):
        vector = [0.0] * model.dimension
        vector[i] = 1.0
        r = httpx.post(f"{api_base}/voiceprints/import", data={"label": label, "model": model.name},
                       files={"file": ("v.json", json_embedding_file(vector), "application/json")}, timeout=30)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    audio = tmp_path / "a.wav"
    audio.write_bytes(tone_wav())
    with Client(api_base) as client:
        # before: InputError "voiceprints: no voiceprint \"['vp_…'\""
        job = client.submit("identify", audio, voiceprints=ids)
        assert job["status"] == "queued" and job["kind"] == "identify", job
        record = _record(redis_client, job["job_id"])
        assert set(record["_kept_apart"]) == {"voiceprints"}, record
        # the ids as a string, as before, and a tuple, alike
        assert client.submit("identify", audio, voiceprints=",".join(ids))["status"] == "queued"
        assert client.submit("identify", audio, voiceprints=tuple(ids))["status"] == "queued"
        with pytest.raises(InputError, match="no voiceprint 'vp_0123'"):
            client.submit("identify", audio, voiceprints=[ids[0], "vp_0123"])


# --- the production profile without its weights -------------------------------------------------

@pytest.mark.parametrize("loader", ["diarization", "ecapa"])
@pytest.mark.parametrize("model_dir", [None, "empty"])
def test_production_models_missing_offline_say_how_to_give_them(tmp_path, monkeypatch, loader, model_dir):
    import torch

    from engine.models.loading import load_production_diarization, load_production_ecapa
    from shared.errors import ModelError
    from shared.settings import Settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(model_profile="production", model_dir=tmp_path if model_dir else None)
    with pytest.raises(ModelError) as raised:
        if loader == "diarization":
            load_production_diarization(settings)
        else:
            load_production_ecapa(settings, torch.device("cpu"))
    message = raised.value.detail
    # before: "... is not in the model directory and the hub is offline"
    assert ("AUDIO_ANALYSIS_MODEL_DIR is not set" if model_dir is None
            else "not in AUDIO_ANALYSIS_MODEL_DIR") in message, message
    assert "scripts/fetch_models.py --out DIR" in message and "AUDIO_ANALYSIS_HF_TOKEN" in message, message
    assert str(tmp_path) not in message


# --- /docs: "Try it out" --------------------------------------------------------------------------

def test_every_optional_form_field_is_documented_empty(api_base):
    """What "Try it out" fills in is each field's example: empty for every optional field of
    every route (uploads aside: a file input)."""
    import httpx

    document = httpx.get(f"{api_base}/openapi.json", timeout=30).json()
    filled = []
    for name, schema in document["components"]["schemas"].items():
        if not name.startswith("Body_"):
            continue
        required = set(schema.get("required") or [])
        for field, spec in schema["properties"].items():
            if field in required or "contentMediaType" in json.dumps(spec):
                continue
            if spec.get("examples") != [""]:
                filled.append((name, field))
    assert not filled, filled


def _try_it_out(browser, api_base: str, operation: str):  # noqa: F811
    """The /docs page's form of ``operation``, opened and put in "Try it out": (page, its block)."""
    page = browser.new_page()
    page.goto(f"{api_base}/docs")
    block = page.locator(f"#{operation}")
    block.locator(".opblock-summary").first.click()
    block.locator("button.try-out__btn").click()
    return page, block


def _executed(block) -> tuple[str, str]:
    """Execute the form: the answer's status and body as the page shows them."""
    block.locator("button.execute").click()
    answered = block.locator(".live-responses-table tbody .response-col_status").first
    answered.wait_for(timeout=60_000)
    return answered.inner_text().split()[0], block.locator(".live-responses-table .microlight").first.inner_text()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
@pytest.mark.parametrize("operation,upload,status", [
    ("operations-jobs-submit_diarize_jobs_diarize_post", "a.wav", "202"),
    ("operations-voiceprints-import_voiceprint_voiceprints_import_post", "vp.json", "201"),
])
def test_try_it_out_in_the_docs_with_only_a_file(api_base, settings, browser, tmp_path, operation, upload,  # noqa: F811
                                                 status):
    from shared.voiceprints import embedding_model
    from tests.conftest import tone_wav

    model = embedding_model(settings)
    path = tmp_path / upload
    if upload.endswith(".wav"):
        path.write_bytes(tone_wav(2.0))
    else:
        path.write_text(json.dumps({"format": "audio-analysis/voiceprint-v1", "label": "Ada", "model": model.name,
                                    "dimension": model.dimension, "embedding": [1.0] + [0.0] * (model.dimension - 1)}))
    page, block = _try_it_out(browser, api_base, operation)
    try:
        block.locator("input[type=file]").first.set_input_files(str(path))
        answered, body = _executed(block)
        # before: 422, "file: give either an upload or file_url, not both" (file_url=string
        # sent); the import: 422, a voiceprint of model "string"
        assert answered == status, (answered, body[:500])
    finally:
        page.close()


def test_every_field_of_several_uploads_is_documented_as_files(api_base):
    import httpx

    document = httpx.get(f"{api_base}/openapi.json", timeout=30).json()
    arrays = {(name, field): spec["items"] for name, schema in document["components"]["schemas"].items()
              for field, spec in schema.get("properties", {}).items()
              if spec.get("type") == "array" and "contentMediaType" in spec.get("items", {})}
    assert {field for _, field in arrays} == {"files"} and len(arrays) == 3, arrays
    assert all(items.get("format") == "binary" for items in arrays.values()), arrays


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
@pytest.mark.parametrize("operation,label", [
    ("operations-jobs-submit_batch_jobs_batch_post", None),
    ("operations-jobs-submit_enroll_jobs_enroll_post", "Ada"),
])
def test_try_it_out_in_the_docs_with_several_files(api_base, browser, tmp_path, operation, label):  # noqa: F811
    from tests.conftest import tone_wav

    paths = []
    for name in ("a.wav", "b.wav"):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(tone_wav(2.0))
    page, block = _try_it_out(browser, api_base, operation)
    try:
        for i, path in enumerate(paths):
            # the one array of the form: files (uploads are its only file inputs)
            if block.locator("input[type=file]").count() <= i:
                block.locator("button.json-schema-form-item-add").click()
            # before: a text box, prefilled with random characters
            block.locator("input[type=file]").nth(i).set_input_files(str(path), timeout=10_000)
        if label:
            block.locator("input[placeholder='label']").fill(label)
        answered, body = _executed(block)
        assert answered == "202", (answered, body[:500])
        reply = json.loads(body)
        if label is None:
            assert [job["filename"] for job in reply["jobs"]] == ["a.wav", "b.wav"], reply
        else:
            assert reply["kind"] == "enroll" and reply["status"] == "queued", reply
    finally:
        page.close()


# --- a webhook's payload without a webhook ---------------------------------------------------------

@pytest.mark.parametrize("route, data", [("/jobs/diarize", {}), ("/jobs/batch", {"kind": "diarize"})])
def test_a_webhook_payload_without_a_webhook_url_is_refused(api_base, route, data):
    """`webhook_payload=status` with no `webhook_url` (forgotten, or misspelt `webhook_ur`) was
    accepted (202) and dropped: the client waited for a delivery that never came. 422 now, naming
    both fields, nothing queued; with a URL it is taken as before (the webhook tests)."""
    import httpx

    from tests.conftest import tone_wav

    field = "files" if route == "/jobs/batch" else "file"
    before = httpx.get(f"{api_base}/jobs?limit=100", timeout=30).json()["count"]
    r = httpx.post(f"{api_base}{route}", data={**data, "webhook_payload": "status"},
                   files=[(field, ("a.wav", tone_wav(), "audio/wav"))], timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("webhook_payload: given without webhook_url"), r.json()
    assert httpx.get(f"{api_base}/jobs?limit=100", timeout=30).json()["count"] == before
