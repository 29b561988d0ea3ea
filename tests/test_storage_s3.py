"""The S3-compatible upload storage against a real S3-speaking server (moto's standalone server,
started here on 127.0.0.1), and a job that runs through it: API and a worker that share no
directory, only Redis and the bucket.

moto does not emulate: bucket lifecycle rules running on their own, KMS key policies, real
latency and throughput, eventual consistency; those are AWS's (docs/scaling.md).
"""

from __future__ import annotations

import io
import os
import time
from typing import Iterator

import pytest

from shared.settings import Settings
from shared.storage import S3Storage, UploadTooLargeError

BUCKET = "audio-analysis-test"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    from cli.launcher import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    # boto3's usual chain reads these; moto accepts any
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    url = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings(url: str, tmp_path, **extra) -> Settings:
    return Settings(storage_backend="s3", s3_bucket=BUCKET, s3_endpoint_url=url, s3_region="us-east-1",
                    s3_addressing_style="path", storage_dir=tmp_path / "tmp", **extra)


def test_save_read_delete_and_sweep(s3_server, tmp_path) -> None:
    storage = S3Storage(_settings(s3_server, tmp_path, s3_server_side_encryption="AES256"))
    data = os.urandom(40 * 1024 * 1024 + 123)  # past the 16 MiB threshold: a multipart upload
    key = storage.save("job1", "file", io.BytesIO(data), max_bytes=len(data))
    assert key == "job1/file" and storage.exists(key)
    head = storage.client.head_object(Bucket=BUCKET, Key="uploads/job1/file")
    assert head["ContentLength"] == len(data) and head["ServerSideEncryption"] == "AES256"
    with storage.local_path(key) as path:
        assert path.read_bytes() == data
        assert path.parent == tmp_path / "tmp"
    assert not path.exists()  # the worker's copy goes with the block
    storage.save("job1", "file2", io.BytesIO(b"x" * 10), max_bytes=100)
    storage.delete_job("job1")
    assert not storage.exists(key) and not storage.exists("job1/file2")
    with pytest.raises(FileNotFoundError):
        with storage.local_path(key):
            pass

    storage.save("old", "file", io.BytesIO(b"a"), max_bytes=10)
    assert storage.sweep(3600) == 0 and storage.exists("old/file")
    time.sleep(1.1)
    assert storage.sweep(0.5) == 1 and not storage.exists("old/file")


def test_too_large_upload_is_refused_and_leaves_nothing(s3_server, tmp_path) -> None:
    storage = S3Storage(_settings(s3_server, tmp_path))
    with pytest.raises(UploadTooLargeError) as info:
        storage.save("big", "file", io.BytesIO(b"\0" * (20 * 1024 * 1024)), max_bytes=17 * 1024 * 1024)
    assert info.value.status_code == 413
    assert not storage.exists("big/file")
    uploads = storage.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert not [u for u in uploads if u["Key"].startswith("uploads/big/")], uploads


def test_keys_cannot_leave_the_prefix(s3_server, tmp_path) -> None:
    storage = S3Storage(_settings(s3_server, tmp_path))
    key = storage.save("../../etc", "../passwd", io.BytesIO(b"x"), max_bytes=10)
    listed = [o["Key"] for o in storage.client.list_objects_v2(Bucket=BUCKET, Prefix="uploads/").get("Contents", [])]
    # one object under the prefix, two plain path segments below it: nothing climbs out
    assert all(k.startswith("uploads/") and k.count("/") == 2 and not {"..", "."} & set(k.split("/"))
               for k in listed), listed
    storage.delete_job(key.partition("/")[0])


def test_a_job_runs_with_api_and_worker_sharing_only_redis_and_the_bucket(s3_server, service_env, settings,
                                                                          utterances, tmp_path) -> None:
    """The worker gets its own working directory and queue; the upload exists only in the bucket."""
    import httpx

    from cli.launcher import Stack, free_port, wait_until
    from shared.jobs import JobStore

    queue = "audio-s3"
    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    env.update({
        "AUDIO_ANALYSIS_STORAGE_BACKEND": "s3", "AUDIO_ANALYSIS_S3_BUCKET": BUCKET,
        "AUDIO_ANALYSIS_S3_ENDPOINT_URL": s3_server, "AUDIO_ANALYSIS_S3_REGION": "us-east-1",
        "AUDIO_ANALYSIS_S3_ADDRESSING_STYLE": "path", "AUDIO_ANALYSIS_QUEUE_NAME": queue,
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
    })
    store = JobStore.from_settings(settings)
    with Stack(env={**os.environ, **env}, log_dir=tmp_path) as stack:
        api_env = {"AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "api-host")}
        worker_env = {"AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "worker-host"), "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "true"}
        stack.env.update(api_env)
        port = free_port()
        stack.start_api("127.0.0.1", port)
        worker = stack.start_worker(queues=[queue], name="s3-worker", env=worker_env)
        wait_until(lambda: any(w["worker"].startswith("s3-worker@") and w.get("verification_model_loaded")
                               for w in store.workers()), 240, "s3 worker", worker)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            utterance = utterances["spk1"][0]
            r = http.post("/jobs/embedding", files={"file": (utterance.name, utterance.read_bytes(), "audio/wav")})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 180
            while (job := http.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.3)
        assert job["status"] == "succeeded", job
        assert len(job["result"]["embedding"]) == 192
        # nothing of the upload on either host's disk, nor left in the bucket
        for host in ("api-host", "worker-host"):
            leftovers = [p for p in (tmp_path / host).rglob("*") if p.is_file()] if (tmp_path / host).exists() else []
            assert leftovers == [], (host, leftovers)
        storage = S3Storage(_settings(s3_server, tmp_path))
        assert not storage.exists(f"{job_id}/file")
