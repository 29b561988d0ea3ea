"""The documentation followed literally, as a new integrator does: README.md, docs/service.md,
the OpenAPI document the API serves, ``audio-analysis --help`` and its commands' help.

Each test fails on the code (or the docs) before its fix:

* docs/service.md's audio-by-URL example, ``curl -X POST …/jobs/diarize --data-urlencode
  'file_url=…' -F num_speakers=2``, mixed an urlencoded body with a multipart one: curl refuses
  that ("You can only select one HTTP request method!", exit 2) and sends nothing. The example,
  run as written against a real API, is now answered 202 with ``num_speakers`` received.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "aa-docs-trial"
QUEUE, WEBHOOK_QUEUE = "audio-docs-trial", "webhooks-docs-trial"  # nobody consumes them: jobs stay queued


@pytest.fixture(scope="module")
def redis_client(settings):
    import redis

    r = redis.Redis.from_url(settings.redis_url)
    yield r
    for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
        r.delete(key)
    r.delete(QUEUE, WEBHOOK_QUEUE)


@pytest.fixture(scope="module")
def api_base(service_env, settings, redis_client, tmp_path_factory) -> Iterator[str]:
    """The API under a real uvicorn (api.serve), without API keys as `up` runs it, in keys and
    queues of its own: its base URL."""
    from tests.conftest import api_under_uvicorn

    env = {"AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE,
           "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": WEBHOOK_QUEUE,
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp("docs-trial-uploads"))}
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("docs-trial-api"), [], env) as base:
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

