"""The Python client (and so the CLI's submit) retries what a network or a restarting service
loses, without running a recording twice: through a real uvicorn API and the session's worker,
behind a proxy that loses answers on purpose."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from tests.conftest import api_under_uvicorn


@contextmanager
def lossy_proxy(upstream: str, loses: Callable[[int], bool]) -> Iterator[str]:
    """A TCP proxy to ``upstream`` whose n-th connection (from 0), where ``loses(n)``, passes the
    request on and then closes, both ways, as soon as the answer's first bytes come back: the
    service did the work, the client never hears of it (a reset, a load balancer's timeout)."""
    target = urlsplit(upstream)
    listener = socket.create_server(("127.0.0.1", 0))
    count = {"n": 0}
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket, cut: bool) -> None:
        try:
            while data := src.recv(65536):
                if cut:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            n, count["n"] = count["n"], count["n"] + 1
            server = socket.create_connection((target.hostname, target.port))
            threading.Thread(target=pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client, loses(n)), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_submit_whose_answer_is_lost_is_retried_and_runs_once(worker, service_env, tmp_path, utterances):
    """The first answer to the submit is lost after the service queued the job. The client raised
    httpx.RemoteProtocolError, so a caller that retried (or the user, running the command
    again) ran the hour twice. Now the client sends again with the same Idempotency-Key and gets
    the job the first attempt made; the tenant has that one job, and it runs once. A poll of
    ``wait`` whose answer is lost is retried too."""
    from cli.client import Client

    api_key = f"client-retry-{uuid.uuid4().hex[:8]}"
    with api_under_uvicorn(service_env, tmp_path, [api_key]) as base:
        # connection 0: the submit, answered and lost; 2: the first poll of wait, lost too
        with lossy_proxy(base, lambda n: n in (0, 2)) as proxy:
            with Client(proxy, api_key=api_key, retry_wait_max_s=0.2) as client:
                job = client.submit("embedding", utterances["spk1"][0])
                done = client.wait(job["job_id"], timeout_s=120, interval_s=0.2)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        listing = httpx.get(f"{base}/jobs", headers={"X-API-Key": api_key}).json()
        assert [j["job_id"] for j in listing["jobs"]] == [job["job_id"]], listing


def test_an_enrollment_whose_answer_is_lost_is_retried_and_stores_one_voiceprint(
        worker, service_env, tmp_path, utterances):
    """The first answer to an enrollment is lost after the voiceprint was stored. The client did
    not retry it (httpx.RemoteProtocolError to the caller, whose own retry stored the person
    twice); now it sends it again with the same Idempotency-Key and is answered the voiceprint the
    first attempt stored: the key keeps one voiceprint, from one enroll job."""
    from cli.client import Client

    api_key = f"client-enrol-{uuid.uuid4().hex[:8]}"
    with api_under_uvicorn(service_env, tmp_path, [api_key]) as base:
        with lossy_proxy(base, lambda n: n == 0) as proxy:
            with Client(proxy, api_key=api_key, retry_wait_max_s=0.2) as client:
                vp = client.create_voiceprint("Ann", *utterances["spk1"][:2])
        headers = {"X-API-Key": api_key}
        listed = httpx.get(f"{base}/voiceprints", headers=headers).json()["voiceprints"]
        assert [v["id"] for v in listed] == [vp["id"]], listed
        jobs = httpx.get(f"{base}/jobs", headers=headers).json()["jobs"]
        assert [(j["kind"], j["status"]) for j in jobs] == [("enroll", "succeeded")], jobs


def test_a_client_gives_up_after_its_retries(service_env, tmp_path, utterances):
    """A service that loses every answer: the error comes back after ``retries`` + 1 attempts,
    not an endless loop."""
    from cli.client import Client

    api_key = f"client-retry-{uuid.uuid4().hex[:8]}"
    attempts: list[int] = []

    def loses(n: int) -> bool:
        attempts.append(n)
        return True

    with api_under_uvicorn(service_env, tmp_path, [api_key]) as base:
        with lossy_proxy(base, loses) as proxy:
            with Client(proxy, api_key=api_key, retries=2, retry_wait_max_s=0.1) as client:
                try:
                    client.submit("embedding", utterances["spk1"][0])
                except httpx.TransportError:
                    pass
                else:
                    raise AssertionError("every answer was lost, yet submit returned")
    assert len(attempts) == 3, attempts


def test_a_submit_over_the_tenants_quota_waits_for_a_slot(worker, service_env, tmp_path, long_sample, utterances):
    """A tenant at its quota of unfinished jobs is answered 429 with Retry-After; the client (and
    so `audio-analysis submit` of a folder's recordings) waited for nothing and failed the
    submission. It now sends it again after the wait, and it is taken once a job has ended."""
    from cli.client import Client
    from shared.errors import AnalysisError

    api_key = f"client-quota-{uuid.uuid4().hex[:8]}"
    with api_under_uvicorn(service_env, tmp_path, [api_key],
                           extra_env={"AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS": "1"}) as base:
        with Client(base, api_key=api_key, retries=0) as impatient:
            first = impatient.submit("diarize", long_sample)  # two minutes of speech: seconds of work
            try:
                impatient.submit("embedding", utterances["spk1"][0])
            except AnalysisError as exc:
                assert exc.status_code == 429, exc
            else:
                raise AssertionError("a second job was taken past a quota of one")
        with Client(base, api_key=api_key, retries=60, retry_wait_max_s=0.5) as client:
            second = client.submit("embedding", utterances["spk1"][0])
            done = client.wait(second["job_id"], timeout_s=180, interval_s=0.2)
            assert client.wait(first["job_id"], timeout_s=10)["status"] == "succeeded"
        assert done["status"] == "succeeded", done
        refusals = [line for line in httpx.get(f"{base}/metrics").text.splitlines()
                    if line.startswith("audio_analysis_quota_refusals_total") and 'limit="jobs"' in line]
        assert refusals and float(refusals[0].split()[-1]) >= 2, refusals  # the impatient one's and the retry's
