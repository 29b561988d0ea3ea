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
from pathlib import Path
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


def test_the_api_reads_the_header_from_the_upload_not_back_from_the_bucket(s3_server, settings, utterances,
                                                                          tmp_path, monkeypatch) -> None:
    """With S3 storage the API checks duration and rate on the upload it received: a refused file
    is never written to the bucket, and an accepted one is not downloaded again to be checked."""
    import numpy as np
    import soundfile as sf
    from fastapi.testclient import TestClient

    from api.main import create_app

    def no_download(self, key):  # the API must not read an object back
        raise AssertionError(f"the API downloaded {key} from the bucket")

    monkeypatch.setattr(S3Storage, "local_path", no_download)
    local = settings.model_copy(update={
        "storage_backend": "s3", "s3_bucket": BUCKET, "s3_endpoint_url": s3_server, "s3_region": "us-east-1",
        "s3_addressing_style": "path", "storage_dir": tmp_path / "tmp", "queue_name": "audio-s3-header"})
    storage = S3Storage(_settings(s3_server, tmp_path))
    before = {o["Key"] for o in storage.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    # 31 min of silence as FLAC (a few KB): over the synchronous endpoints' 30 min
    long = io.BytesIO()
    sf.write(long, np.zeros(31 * 60 * 8000, dtype=np.int16), 8000, format="FLAC")
    with TestClient(create_app(local), raise_server_exceptions=False) as client:
        refused = client.post("/diarize", files={"file": ("long.flac", long.getvalue(), "audio/flac")})
        assert refused.status_code == 413 and "/jobs/" in refused.json()["detail"], refused.text
        accepted = client.post("/jobs/embedding", files={"file": ("a.wav", utterances["spk1"][0].read_bytes(), "audio/wav")})
        assert accepted.status_code == 202, accepted.text
    after = {o["Key"] for o in storage.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    # the accepted upload is in the bucket, whole; nothing of the refused one is
    assert [k for k in after - before if accepted.json()["job_id"] in k] != []
    assert len(after - before) == 1, after - before
    key = next(iter(after - before))
    body = storage.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == utterances["spk1"][0].read_bytes()


def test_two_hosts_sharing_only_redis_and_the_bucket_lose_no_job(s3_server, service_env, settings, short_sample,
                                                                 tmp_path) -> None:
    """API and two workers as if on three hosts: each its own working directory, nothing shared
    but Redis and the bucket. The worker running a diarization is killed (SIGKILL, as the OOM
    killer or a lost host would); the other runs the job to the end, once. The job is a 12 s
    clip whose first run holds at its first progress (tests/_held_engine_worker.py): killed
    mid-run on a machine of any speed, and run again in full by the real engine."""
    import signal
    import sys

    import httpx

    from cli.launcher import Stack, free_port, wait_until
    from shared.jobs import JobStore

    queue = "audio-s3"
    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    env.update({
        "AUDIO_ANALYSIS_STORAGE_BACKEND": "s3", "AUDIO_ANALYSIS_S3_BUCKET": BUCKET,
        "AUDIO_ANALYSIS_S3_ENDPOINT_URL": s3_server, "AUDIO_ANALYSIS_S3_REGION": "us-east-1",
        "AUDIO_ANALYSIS_S3_ADDRESSING_STYLE": "path", "AUDIO_ANALYSIS_QUEUE_NAME": queue,
        "AUDIO_ANALYSIS_JOB_LEASE_S": "3", "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "HELD_ENGINE_MARKER": str(tmp_path / "held"),
    })
    store = JobStore.from_settings(settings)
    hosts = {name: tmp_path / name for name in ("api-host", "host-a", "host-b")}
    with Stack(env={**os.environ, **env, "AUDIO_ANALYSIS_STORAGE_DIR": str(hosts["api-host"])}, log_dir=tmp_path) as stack:
        port = free_port()
        stack.start_api("127.0.0.1", port)
        workers = {name: stack.spawn(name, [
            sys.executable, "-m", "tests._held_engine_worker", "--pool", "solo", "--concurrency", "1", "-Q", queue,
            "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], env={"AUDIO_ANALYSIS_STORAGE_DIR": str(hosts[name])}) for name in ("host-a", "host-b")}

        def ready() -> bool:
            loaded = {w["worker"].split("@")[0] for w in store.workers() if w.get("diarization_model_loaded")}
            return set(workers) <= loaded

        wait_until(ready, 300, "two s3 workers", next(iter(workers.values())))
        finished_before = store.finished_counts().get(("diarize", "succeeded"), 0)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            r = http.post("/jobs/diarize", files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            storage = S3Storage(_settings(s3_server, tmp_path))
            assert storage.exists(f"{job_id}/file")
            pids = {name: proc.pid for name, proc in workers.items()}
            deadline = time.monotonic() + 120
            victim = None
            while victim is None:
                job = http.get(f"/jobs/{job_id}").json()
                token = store.redis.get(store.key("job", job_id, "lease"))
                if job["status"] == "running" and job["progress"] > 0 and token:
                    victim = next((n for n, pid in pids.items() if pid == int(token.split("|")[1])), None)
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert (tmp_path / "held").read_text() == str(pids[victim]), "the job is not mid-run in its worker"
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait(10)
            survivor = next(n for n in workers if n != victim)
            deadline = time.monotonic() + 240
            while (job := http.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
        print(f"\ntwo hosts over S3: {victim} killed mid-job, {survivor} finished it on attempt {job['attempts']}")
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2 and job["result"]["segments_count"] > 0
        # run to the end once: one more succeeded diarization in the counters, not two (counted in
        # the transaction that wrote the record the loop above saw)
        assert store.finished_counts().get(("diarize", "succeeded"), 0) == finished_before + 1
        assert workers[survivor].poll() is None
        # nothing of the upload left in the bucket (deleted right after the result is recorded)
        # or on the surviving hosts' disks
        deadline = time.monotonic() + 10
        while storage.exists(f"{job_id}/file"):
            assert time.monotonic() < deadline, "the upload stayed in the bucket"
            time.sleep(0.1)
        for name in ("api-host", survivor):
            leftovers = [p for p in hosts[name].rglob("*") if p.is_file()] if hosts[name].exists() else []
            assert leftovers == [], (name, leftovers)


_HOLD_A_COPY = """
import io, os, sys, time
from pathlib import Path
from shared.settings import Settings
from shared.storage import S3Storage
storage = S3Storage(Settings(storage_backend="s3", s3_bucket=sys.argv[1], s3_endpoint_url=sys.argv[2],
                             s3_region="us-east-1", s3_addressing_style="path", storage_dir=Path(sys.argv[3])))
with storage.local_path("killed/file") as path:
    print(path, flush=True)
    time.sleep(600)  # a job running on its copy, until the kill
"""


def test_a_killed_workers_copy_is_swept(s3_server, tmp_path) -> None:
    """A worker process killed mid-job (SIGKILL, the OOM killer) never reaches the end of
    ``local_path``: its copy of the upload stayed in the scratch folder for good, one more for
    every kill (a Kubernetes emptyDir outlives the container). The sweep removes copies older
    than a job may run, and leaves a running job's copy alone."""
    import signal
    import subprocess
    import sys

    settings = _settings(s3_server, tmp_path)
    storage = S3Storage(settings)
    storage.save("killed", "file", io.BytesIO(b"k" * 4096), max_bytes=10_000)
    storage.save("running", "file", io.BytesIO(b"r" * 4096), max_bytes=10_000)
    # a real process with its copy open, killed the way the OOM killer kills
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_COPY, BUCKET, s3_server, str(settings.storage_dir)],
                            stdout=subprocess.PIPE, text=True, env=os.environ)
    left = Path(proc.stdout.readline().strip())
    assert left.is_file() and left.read_bytes() == b"k" * 4096
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert left.is_file()  # nothing of the process cleaned it up
    day = 24 * 3600
    os.utime(left, (time.time() - day - 60, time.time() - day - 60))  # a day later
    with storage.local_path("running/file") as running:
        storage.sweep(day)
        assert not left.exists(), "the killed worker's copy stayed"
        assert running.is_file() and running.read_bytes() == b"r" * 4096
    assert not running.exists()
