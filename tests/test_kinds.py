"""Job kinds are declared once (shared/kinds.py): every surface is derived from the registry.

These tests read each surface the way its user does (the API's OpenAPI document, the worker's
Celery task table, the Python client, the CLI's help) and check it against the declarations, so
a kind added to the registry shows up everywhere or a test fails. Records queued before kinds
were declared once (upload keys among the parameters, the embedding file stored) still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.jobs import JobRecord
from shared.kinds import KINDS, CompareEmbeddingParams, DiarizeParams, get_kind
from shared.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def openapi() -> dict:
    from api.main import create_app
    from shared.settings import Settings

    app = create_app(Settings(webhook_secret="k" * 32, redis_url="redis://127.0.0.1:6379/15"))
    return app.openapi()


def _form_fields(spec: dict, path: str) -> set[str]:
    body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    return set(spec["components"]["schemas"][name]["properties"])


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_has_its_routes_with_exactly_its_fields(openapi, name) -> None:
    kind = KINDS[name]
    expected = {f.name for f in kind.files} | set(kind.form_fields)
    # each single audio upload may be given by URL instead, as <name>_url (and is then optional);
    # a multiple-file field (enroll's files) is uploads only
    urls = {f"{f.name}_url" for f in kind.audio_files if not f.multiple}
    assert set(kind.url_fields) == urls
    assert _form_fields(openapi, f"/jobs/{name}") == expected | urls | {"webhook_url", "webhook_payload"}
    body = openapi["paths"][f"/jobs/{name}"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    required = set(openapi["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]].get("required", []))
    # and the parameters the kind cannot run without (enroll's label, identify's voiceprints)
    needed = {n for n, f in kind.form_fields.items() if f.is_required()}
    assert required == {f.name for f in kind.files if not f.audio or f.multiple} | needed
    assert "202" in openapi["paths"][f"/jobs/{name}"]["post"]["responses"]
    if kind.sync_path:
        # the synchronous contract is unchanged: uploads only, all required
        assert _form_fields(openapi, kind.sync_path) == expected
        body = openapi["paths"][kind.sync_path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        required = set(openapi["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]].get("required", []))
        assert required == {f.name for f in kind.files} | needed
        # the synchronous route documents the kind's own result model
        ok = openapi["paths"][kind.sync_path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith(f"/{kind.result.__name__}")


def test_batch_offers_the_batch_kinds(openapi) -> None:
    fields = _form_fields(openapi, "/jobs/batch")
    batch = [k for k in KINDS.values() if k.batch]
    assert {"kind", "files", "webhook_url", "webhook_payload"} | {n for k in batch for n in k.form_fields} == fields


def test_result_formats_follow_the_registry(openapi) -> None:
    get = openapi["paths"]["/jobs/{job_id}/result"]["get"]
    (fmt,) = [p for p in get["parameters"] if p["name"] == "format"]
    offered = {f for k in KINDS.values() for f in k.formats}
    assert set(fmt["schema"]["enum"]) == offered == {"json", "rttm", "srt", "vtt"}
    assert {"application/json", "text/vtt", "application/x-subrip", "text/plain"} <= set(get["responses"]["200"]["content"])
    assert {"404", "409", "422"} <= set(get["responses"])


def test_the_worker_registers_one_task_per_kind() -> None:
    # in a fresh interpreter: importing the worker's task table must not load torch either
    code = (
        "import json, sys; from worker.celery_app import app; import worker.tasks; "
        "print(json.dumps({'tasks': sorted(t for t in app.tasks if t.startswith('audio.')), "
        "'torch': 'torch' in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**__import__("os").environ, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tasks"] == sorted([k.task_name for k in KINDS.values()] + ["audio.deliver_webhook"])
    assert report["torch"] is False


def test_client_and_cli_follow_the_registry() -> None:
    from cli.client import FILE_FIELDS, URL_FIELDS

    assert FILE_FIELDS == {n: tuple(f.name for f in k.files) for n, k in KINDS.items()}
    assert URL_FIELDS == {n: {f.name: f"{f.name}_url" for f in k.audio_files if not f.multiple}
                          for n, k in KINDS.items()}
    from typer.testing import CliRunner

    from cli.main import COMMAND_NAMES, app

    runner = CliRunner()
    for name, kind in KINDS.items():
        command = COMMAND_NAMES.get(name, name.replace("_", "-"))
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for field in kind.form_fields:
            assert "--" + field.replace("_", "-") in result.output, (command, field)
    submit = runner.invoke(app, ["submit", "--help"], env={"COLUMNS": "200"})
    assert all(name in submit.output for name in KINDS)
    assert "FILE_OR_URL" in submit.output


def test_kept_apart_parameters_are_lists_of_their_kind() -> None:
    # JobStore.keep_apart stores a list item by item, and the record carries its digest instead
    from typing import get_args, get_origin

    for kind in KINDS.values():
        for name in kind.kept_apart:
            annotation = kind.params.model_fields[name].annotation
            assert list in {get_origin(a) for a in (annotation, *get_args(annotation))}, (kind.name, name)
    assert {k.name for k in KINDS.values() if k.kept_apart} == {"diarize", "identify"}


def test_parameters_are_validated_by_the_kind_model() -> None:
    kind = get_kind("diarize")
    assert kind.parse_params({"num_speakers": 3, "min_speakers": None}) == DiarizeParams(num_speakers=3)
    for bad in ({"num_speakers": 0}, {"min_speakers": 4, "max_speakers": 2}, {"min_duration": float("nan")},
                {"speakers": 2}):
        with pytest.raises(InputError) as info:
            kind.parse_params(bad)
        assert info.value.status_code == 422
    with pytest.raises(InputError, match="unknown job kind"):
        get_kind("transcribe")


def _legacy_record(tmp_path: Path, utterances) -> tuple[JobRecord, dict[str, Path]]:
    """A compare_embedding job as the API stored it before kinds were declared once."""
    vector = np.linspace(-1, 1, 192, dtype=np.float32)
    (tmp_path / "emb.npy").write_bytes(b"")
    np.save(tmp_path / "emb.npy", vector)
    paths = {"j/audio": Path(utterances["spk1"][0]), "j/embedding": tmp_path / "emb.npy"}
    raw = json.dumps({
        "job_id": "j", "kind": "compare_embedding", "status": "queued", "created_at": "2026-01-01T00:00:00Z",
        "_uploads": list(paths), "_owner": None, "_queue": "audio",
        "_params": {"threshold": 0.3, "embedding_filename": "alice.npy", "audio": "j/audio", "embedding": "j/embedding"},
    })
    return JobRecord.from_json(raw), paths


def test_records_queued_before_the_registry_still_run(service_env, tmp_path, utterances) -> None:
    # service_env first: importing worker.tasks freezes its settings (and Celery app) at import
    from worker.tasks import _inputs

    record, paths = _legacy_record(tmp_path, utterances)
    assert record.files == {"audio": "j/audio", "embedding": "j/embedding"}
    params, files = _inputs(KINDS["compare_embedding"], record, None, lambda key, audio=True: paths[key])
    assert isinstance(params, CompareEmbeddingParams) and params.threshold == 0.3
    assert np.allclose(params.embedding, np.linspace(-1, 1, 192), atol=1e-6)
    assert files == {"audio": paths["j/audio"]}
    # and a record as the API writes it now: the numbers in the parameters, one audio upload
    now = JobRecord(job_id="k", kind="compare_embedding", files={"audio": "j/audio"},
                    params=params.model_dump(mode="json"))
    again, files = _inputs(KINDS["compare_embedding"], JobRecord.from_json(now.to_json()), None,
                           lambda key, audio=True: paths[key])
    assert again == params and files == {"audio": paths["j/audio"]}
    # internal fields never leave in the public view
    assert not any(k.startswith("_") or k in ("params", "files", "owner") for k in now.public())
