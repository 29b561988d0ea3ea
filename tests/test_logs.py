"""Logs that follow a job (shared/logs.py): one JSON object a line, and every line about a job,
in the API under uvicorn and in the real worker, carries the job's id, and the request id of the
HTTP call that created it."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterator

import httpx
import pytest

from shared import logs
from tests.conftest import wait_for_job


@pytest.fixture(scope="module")
def api(service_env, worker, tmp_path_factory) -> Iterator[tuple[str, object]]:
    from cli.launcher import Stack, free_port

    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    log_dir = tmp_path_factory.mktemp("api-logs")
    stack = Stack(env={**os.environ, **env, "AUDIO_ANALYSIS_LOG_FORMAT": "json"}, log_dir=log_dir)
    port = free_port()
    try:
        stack.start_api("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}", log_dir / "api.log"
    finally:
        stack.stop()


def _lines(path) -> tuple[list[dict], list[str]]:
    parsed, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        (parsed if isinstance(value, dict) else other).append(value if isinstance(value, dict) else line)
    return parsed, other


def test_every_line_about_a_job_carries_its_ids(api, worker, short_sample) -> None:
    base, api_log = api
    request_id = "trace-" + os.urandom(6).hex()
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/jobs/diarize", files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")},
                      headers={"X-Request-ID": request_id})
        assert r.status_code == 202, r.text
        assert r.headers["x-request-id"] == request_id
        job_id = r.json()["job_id"]
        wait_for_job(http, job_id)
        # a request without an id (or with a hostile one) gets a fresh one
        assert len(http.get("/health", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]) == 16

    # the worker writes "job succeeded" just after the record it finished, which wait_for_job saw:
    # waited for, not read at once (that read raced the worker's line)
    deadline = time.monotonic() + 10
    while not any(line.get("job_id") == job_id and line.get("message") == "job succeeded"
                  for line in _lines(worker.log_path)[0]):
        assert time.monotonic() < deadline, "the worker never logged the job's end"
        time.sleep(0.05)
    api_lines, api_other = _lines(api_log)
    worker_lines, worker_other = _lines(worker.log_path)
    assert not [line for line in api_other + worker_other if job_id in line], "a plain-text line names the job"
    about = {name: [line for line in lines if job_id in json.dumps(line)]
             for name, lines in (("api", api_lines), ("worker", worker_lines))}
    for name, lines in about.items():
        assert lines, f"no {name} line about the job"
        wrong = [line for line in lines if line.get("job_id") != job_id]
        assert not wrong, (name, wrong[:3])
    assert {"time", "level", "logger", "message"} <= set(about["api"][0])
    # the request that created it: on the API's line and on the worker's lines of the run
    assert any(line.get("request_id") == request_id and "queued" in line["message"] for line in about["api"])
    run = [line for line in about["worker"] if line.get("request_id") == request_id]
    assert any("started" in line["message"] and line.get("attempt") == 1 for line in run)
    assert any(line.get("step") and line.get("kind") == "diarize" for line in run)
    assert any(line["message"] == "job succeeded" for line in run)


def test_text_format_names_the_job_for_a_terminal() -> None:
    record = logging.LogRecord("worker.tasks", logging.INFO, __file__, 1, "step %s", ("embeddings",), None)
    with logs.bound(job_id="abc", kind="diarize", attempt=2):
        assert logs.ContextFilter().filter(record)
    text = logs.formatter("text").format(record)
    assert text.endswith("worker.tasks [job_id=abc kind=diarize attempt=2] step embeddings")
    assert json.loads(logs.formatter("json").format(record))["job_id"] == "abc"
