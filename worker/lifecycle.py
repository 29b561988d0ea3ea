"""Worker process start-up and shutdown: load the models once, then heartbeat into Redis.

``worker_process_init`` fires in every pool process (prefork children and the solo pool), which
is the process that runs jobs, so that is where the models are loaded and where the heartbeat
that /health reads is written from. The threads pool (the webhook workers) sends no such signal:
its tasks run in the worker's main process, which starts the heartbeat at ``worker_ready``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
import threading
import time
from typing import Any

from celery import bootsteps, signals

from shared import logs
from shared.jobs import JobStore, utc_now
from shared.settings import get_settings
from shared.storage import get_storage
from worker import telemetry

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"name": None, "stop": threading.Event(), "thread": None, "load_error": None,
                         # whether the heartbeat thread runs the recovery passes and the sweep (boot)
                         "runs_passes": True,
                         # set once this process's models loaded or failed to (boot)
                         "booted": threading.Event(),
                         # whether the queues are announced while the models load (boot: not after
                         # MAX_LOAD_DEATHS of this worker's processes died loading them)
                         "announce_while_loading": True}
# set by a warm shutdown (SIGTERM, Ctrl-C of `up`): a running job is handed back to the queue
_shutting_down = threading.Event()
_stop_checked: dict[str, float] = {"at": 0.0}


def _stopping_key(hostname: str) -> str:
    # not under "worker:": /health reads every aa:worker:* key as a heartbeat. Per worker, not per
    # node name: two workers of one name on one machine (`celery worker` started twice without -n,
    # both celery@<host>; two pods of -n gpu@%h on one node with host networking) shared the mark,
    # and the warm shutdown of one made the other hand back its running job, then every job it took
    # after (its flag is for good): attempt 53 of one job within 3 s. The worker is its main
    # process, which a prefork pool process knows from before its fork (_main, share_main_stamp)
    from worker.lease import host_id

    main = _main["pid"] or os.getpid()
    return JobStore.from_settings().key("stopping", hostname, f"{host_id()}:{main}")


@signals.worker_shutting_down.connect
def on_shutting_down(sender: str | None = None, **_: Any) -> None:
    """Runs in the worker's main process (inside its signal handler): keep it short.

    The solo pool runs jobs in this very process and sees the flag; prefork children are other
    processes and see the Redis key instead.
    """
    _shutting_down.set()
    if sender:
        def mark() -> None:
            try:
                JobStore.from_settings().redis.set(_stopping_key(sender), "1", ex=300)
            except Exception:  # noqa: BLE001 - Redis down: the solo flag still works
                log.debug("could not mark %s as stopping", sender, exc_info=True)

        threading.Thread(target=mark, name="mark-stopping", daemon=True).start()


def shutting_down(hostname: str | None) -> bool:
    """True once this worker began a warm shutdown (checked by running jobs' progress reports)."""
    if _shutting_down.is_set():
        return True
    now = time.monotonic()
    if not hostname or now - _stop_checked["at"] < 1.0:
        return False
    _stop_checked["at"] = now
    try:
        if JobStore.from_settings().redis.exists(_stopping_key(hostname)):
            _shutting_down.set()
    except Exception:  # noqa: BLE001
        return False
    return _shutting_down.is_set()


def _process_name(node: str) -> str:
    """This process's name among the workers (its heartbeat record's key, /health's ``worker``):
    the node name, the PID and the PID namespace's number. By node name and PID alone, two workers
    of one name in containers sharing a hostname (host networking) at one PID (each namespace
    numbers its own: a solo or threads worker is often PID 1 or 7 in both) wrote one record: /health
    listed one worker of the two, showing the models and ``load_error`` of whichever wrote last,
    and the stop of one deleted the record the other still heartbeat into."""
    from worker.lease import pid_namespace_number

    namespace = pid_namespace_number()
    return f"{node}:{os.getpid()}" + (f"/{namespace}" if namespace else "")


def worker_name() -> str:
    return _state["name"] or _process_name(socket.gethostname())


def heartbeat_info() -> dict[str, Any]:
    settings = get_settings()
    models: dict[str, Any] = {"diarization_model_loaded": False, "verification_model_loaded": False, "model_device": None}
    if settings.worker_load_models:
        # a webhook-delivery worker (or Flower's) runs from the API image, which has no torch
        from engine.core import built_engine

        # never built here: an engine that failed to build (a CUDA device asked for where none
        # is) would fail every heartbeat again, and /health would not show the worker or its
        # load_error at all
        engine = built_engine()
        if engine is not None:
            models = {
                "diarization_model_loaded": engine.diarization_loaded,
                "verification_model_loaded": engine.verification_loaded,
                "model_device": engine.model_device,
            }
    return {
        "worker": worker_name(),
        "pid": os.getpid(),
        **models,
        # process and device readings, exposed by the API's /metrics per worker
        "telemetry": telemetry.sample(models["model_device"]),
        "loads_models": settings.worker_load_models,
        # what it takes jobs from (its -Q): /health shows it, and announce_queues says it per queue
        "queues": consumed_queues(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "load_error": _state["load_error"],
        "last_seen": utc_now(),
    }


def consumed_queues() -> list[str]:
    """The queues this worker takes jobs from: its -Q, selected by the main process before the
    pool forked (a prefork child inherits it; the solo pool is that process)."""
    from celery import current_app

    return sorted(current_app.amqp.queues.consume_from or ())


def announce_queues(store: JobStore, info: dict[str, Any], ttl_s: float) -> None:
    """Keep alive one key per queue this worker consumes, with its heartbeat's lifetime: the key
    lives while any worker of the queue that can run its jobs heartbeats. A worker still loading
    its models counts (the job runs once they are loaded); one whose models failed to load does
    not (it would fail every job). A worker that stops leaves the key to lapse: other workers of
    the queue may still hold it up."""
    if info.get("load_error"):
        return
    pipe = store.redis.pipeline(transaction=False)
    for queue in info.get("queues") or ():
        pipe.set(store.consumers_key(queue), str(info.get("worker", "")), ex=max(1, int(ttl_s)))
    pipe.execute()


# the queues' keys' lifetime while this thread runs a recovery pass or a storage sweep
PASS_TTL_S = 300.0

# A prefork worker's heartbeat is written by its pool processes, which run on when its main process
# is frozen (SIGSTOP) or hung (its consumer's loop blocked): that process then fetches no job and
# acknowledges none, yet /health listed the worker as alive and its queues' keys stayed up for
# good, so synchronous calls were taken for a worker that would never run them. So the main
# process's loop stamps a page it shares with its pool processes (mapped before they fork) every
# MAIN_STAMP_EVERY_S (MainLoopStamp), and a pool process heartbeats, announces and runs the
# passes only while the stamp is younger than main_stall_s(); a stalled worker's heartbeat and
# keys lapse with their TTL (measured: off /health 17 s after a SIGSTOP, at 1 s heartbeats).
MAIN_STAMP_EVERY_S = 1.0
# the least a stamp may age before the main process counts as stalled: its loop may wait on Redis
# for up to the clients' 10 s socket timeout (shared/queue.py) and still be making progress
MIN_MAIN_STALL_S = 15.0
_main: dict[str, Any] = {"page": None, "pid": None, "stalled": False, "liveness_file": None}


def main_stall_s(interval: float) -> float:
    return max(3 * interval, MIN_MAIN_STALL_S)


def _stamp_main() -> None:
    page = _main["page"]
    if page is not None:
        struct.pack_into("d", page, 0, time.monotonic())
    alive = _main["liveness_file"]
    if alive is not None:
        try:  # what an orchestrator's liveness probe reads (worker/alive.py)
            os.utime(alive)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                alive.touch()
        except OSError:
            log.debug("could not touch the liveness file %s", alive, exc_info=True)


def share_main_stamp() -> None:
    """In the worker's main process, before the pool forks (worker_init): the shared page, stamped
    from now on; its consumer's loop keeps stamping it once it runs (MainLoopStamp)."""
    _main["page"] = mmap.mmap(-1, 8)  # anonymous and shared: the forked pool processes see its writes
    _main["pid"] = os.getpid()
    _main["liveness_file"] = get_settings().worker_liveness_file
    _stamp_main()


class MainLoopStamp(bootsteps.StartStopStep):
    """A step of the main process's consumer (worker/celery_app.py): stamps the page from the
    consumer's own loop (kombu's hub), not from a thread of its own, so a loop that hangs stops
    stamping too. Its timer entry is its broker connection's: Celery cancels it when the
    connection is lost and starts the step again with the next one, so a worker reconnecting to
    its broker for longer than main_stall_s() (it takes no job meanwhile) leaves /health too."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        hub = getattr(c, "hub", None)
        if hub is None or _main["page"] is None or _main["pid"] != os.getpid():
            return
        _stamp_main()
        hub.call_repeatedly(MAIN_STAMP_EVERY_S, _stamp_main)


def main_stalled(interval: float) -> bool:
    """True in a pool process whose worker's main process has not stamped for main_stall_s()."""
    page = _main["page"]
    if page is None or _main["pid"] in (None, os.getpid()):
        return False  # the main process itself (solo, threads), or no page (not a Celery worker)
    age = time.monotonic() - struct.unpack_from("d", page, 0)[0]
    stalled = age > main_stall_s(interval)
    if stalled != _main["stalled"]:
        _main["stalled"] = stalled
        if stalled:
            log.error("the worker's main process (pid %s) has made no progress for %.0f s (stopped? hung?): "
                      "no heartbeat, no queue announced until it does", _main["pid"], age)
        else:
            log.warning("the worker's main process (pid %s) makes progress again: heartbeating", _main["pid"])
    return stalled


def _heartbeat_loop(stop: threading.Event) -> None:
    settings = get_settings()
    store = JobStore.from_settings(settings)
    storage = get_storage(settings)
    interval = settings.worker_heartbeat_interval_s
    next_sweep = next_recovery = 0.0
    booted = _state["booted"]
    stall_noted = False
    while not stop.is_set():
        if main_stalled(interval):
            # the heartbeat and the queues' keys lapse; another worker's passes do the recovery,
            # told (once a stall) to look for a message the stalled process's BRPOP may have taken
            if not stall_noted:
                from worker.recovery import note_stalled_consumer

                try:
                    note_stalled_consumer(store, settings)
                    stall_noted = True
                except Exception:  # noqa: BLE001 - Redis away (the stall may be its): said again next turn
                    log.debug("could not note the main process's stall in Redis", exc_info=True)
            stop.wait(min(interval, 1.0))
            continue
        stall_noted = False
        try:
            # read before the info: a load that ends between the two would otherwise have its
            # first heartbeat say loading, without its load_error (boot sets that before booted),
            # and hold the queues' keys up for a worker that cannot run a job
            loaded = booted.is_set()
            info = heartbeat_info()
            # the queues from the start, while the models load (a job taken then runs once they
            # are loaded); the heartbeat /health shows, and the passes below, once the load ended
            if loaded or _state["announce_while_loading"]:
                announce_queues(store, info, ttl_s=interval * 3)
            if loaded:
                store.heartbeat(worker_name(), info, ttl_s=interval * 3)
            now = time.monotonic()
            # the passes are the pool processes' alone (prefork, solo), as before the threads
            # pool's workers heartbeat: a webhook worker (threads, the API's image) may not see
            # the uploads' volume (compose mounts it in the job workers only), so its pass that
            # failed a job deleted nothing, and its sweep swept nothing
            if loaded and _state["runs_passes"] and (now >= next_recovery or now >= next_sweep):
                # the passes run in this thread: a sweep of a large or slow bucket can outlast the
                # queues' keys, and the API would answer synchronous calls 503 meanwhile; held up
                # for the passes, the keys go back to their lifetime after them
                announce_queues(store, info, ttl_s=max(interval * 3, PASS_TTL_S))
                try:
                    if now >= next_recovery:
                        # jobs left "running" by a worker that died (SIGKILL, OOM, Redis crash mid-job)
                        from worker.recovery import (fail_interrupted_submissions, recover_held_jobs,
                                                     recover_lost_deliveries, recover_reserved_jobs,
                                                     recover_stalled_jobs, recover_unqueued_jobs)

                        recover_stalled_jobs(store, storage, settings)
                        # queued jobs whose message a dead worker held (waiting for their confirmation)
                        recover_held_jobs(store, settings)
                        # and queued jobs whose message a worker took and has held too long unstarted
                        recover_reserved_jobs(store, settings)
                        # jobs whose submission stopped between their record and their message
                        fail_interrupted_submissions(store, storage, settings)
                        # webhook deliveries whose worker died while it delivered or held a retry
                        recover_lost_deliveries(store, settings)
                        # and queued jobs whose message is nowhere (lost between the broker and a
                        # worker, a flushed queue); last: it may read a whole queue
                        recover_unqueued_jobs(store, settings)
                        next_recovery = time.monotonic() + settings.job_recovery_interval_s
                    if time.monotonic() >= next_sweep:
                        # uploads of jobs that never reached a worker (expired, purged queue)
                        removed = storage.sweep(settings.upload_expires_s)
                        if removed:
                            log.info("swept %d expired upload folders", removed)
                        next_sweep = time.monotonic() + settings.storage_sweep_interval_s
                finally:
                    announce_queues(store, info, ttl_s=interval * 3)
        except Exception:  # noqa: BLE001 - a Redis blip must not kill the heartbeat
            log.exception("heartbeat failed")
        # while loading, a short wait: the first heartbeat follows the load's end within it
        stop.wait(interval if booted.is_set() else min(interval, 0.5))


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def format_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery's handlers, in our format: JSON lines (or text) with the job's fields."""
    if logger is not None:
        settings = get_settings()
        logs.configure(settings.log_format, handlers=list(logger.handlers))


@signals.worker_init.connect
def preimport(sender: Any = None, **_: Any) -> None:
    from shared.webhooks import InsecureSecretError, check_secret

    settings = get_settings()
    try:
        check_secret(settings.webhook_secret.get_secret_value(), allow_insecure=settings.allow_insecure_webhook_secret)
    except InsecureSecretError as exc:
        log.critical("%s", exc)
        # SystemExit, not an exception: Celery logs and ignores exceptions of signal handlers
        raise SystemExit(1) from None
    share_main_stamp()
    watch_load_deaths(sender)
    # import torch and the pipelines once in the main process so every forked pool process
    # starts with them; no model is built and CUDA is not touched here, so forking stays safe
    if settings.worker_load_models:
        import engine.core  # noqa: F401
        from engine import runtime

        # the pool process forks from here and would share these pages, which the kernel then
        # keeps resident for both (engine.runtime: CUDA's libraries, about 220 MB a CPU worker
        # never runs); handed back before the fork, neither holds them
        if runtime.cpu_only(settings.device):
            runtime.drop_gpu_libraries()
    # stamped again once those imports are done (seconds; more on a loaded host): the pool
    # processes fork next, and the main loop's own stamps begin only once its consumer starts
    _stamp_main()


@signals.worker_ready.connect
def clear_stopping(sender: Any = None, **_: Any) -> None:
    # a restarted worker with the same name must not hand its first job back
    try:
        JobStore.from_settings().redis.delete(_stopping_key(sender.hostname))
    except Exception:  # noqa: BLE001
        log.debug("could not clear the stopping mark", exc_info=True)
    # The prefork and solo pools send worker_process_init from the process that runs the tasks;
    # the threads pool (the webhook workers of compose, Kubernetes and `up`) sends none, so those
    # never heartbeat: /health listed no webhook worker and /metrics had none of their telemetry.
    # Their tasks run in this process, so it heartbeats from here.
    if _state.get("thread") is None and _runs_tasks_here(sender):
        boot(sender=getattr(sender, "hostname", None), runs_passes=False)


def _runs_tasks_here(consumer: Any) -> bool:
    """Whether the worker's pool runs its tasks in this (the main) process: threads, or the
    green pools; prefork runs them in children, which boot on worker_process_init."""
    pool = getattr(consumer, "pool", None)
    return pool is not None and type(pool).__module__.rsplit(".", 1)[-1] in ("thread", "gevent", "eventlet")


# A pool process that dies while it loads the models (the OOM killer, a crash in a GPU driver)
# is replaced by its worker's parent, which then loads them again, and again. Each one announced
# the worker's queues while loading, so a worker that could never run a job kept them alive for
# good: synchronous calls were taken for it and waited AUDIO_ANALYSIS_SYNC_TIMEOUT_S (an hour) for
# a 504, where a worker whose load failed (an exception, load_error) is answered 503 at once. So
# the loads under way are counted per worker (each cleared once its load ended, either way), and
# a process that finds this many of its worker's loads unfinished before its own (its
# predecessors died loading within LOAD_DEATHS_WINDOW_S) announces the queues only once its own
# load succeeded.
MAX_LOAD_DEATHS = 2
LOAD_DEATHS_WINDOW_S = 600
# And the worker itself stayed up for good past those deaths: Kubernetes and compose saw a running
# container, so they never restarted it (a fresh container may well load: memory freed, a driver
# reset), never backed off, never showed CrashLoopBackOff, and no alert fired. So a pool process
# that finds settings.worker_max_load_deaths (3) of its worker's loads died before its own tells
# the worker's main process, through a pipe opened before the pool forked, and that process stops
# with exit status 1 (a warm shutdown: a job another pool process runs is handed back first).
LOAD_DEATHS_EXIT_STATUS = 1
# how long the pool process that gave up waits for its main process to begin its shutdown
GIVE_UP_WAIT_S = 3.0
_giveup: dict[str, Any] = {"write": None, "main_pid": None, "controller": None}


def watch_load_deaths(controller: Any) -> None:
    """In the worker's main process, before the pool forks (worker_init): count this process's
    pool processes' loads afresh (a restarted worker gets its own tries, not its predecessor's
    deaths within LOAD_DEATHS_WINDOW_S), and wait for a pool process to say they keep dying."""
    settings = get_settings()
    if not settings.worker_load_models or settings.worker_max_load_deaths <= 0 or controller is None:
        return
    hostname = getattr(controller, "hostname", None)
    if hostname:
        _load_ended(str(hostname))
    read, write = os.pipe()
    _giveup.update(write=write, main_pid=os.getpid(), controller=controller)

    def wait() -> None:
        try:
            said = os.read(read, 64)
        except OSError:
            return
        if not said:
            return
        from celery.worker import state

        log.critical("the pool processes of this worker died %d times in a row while loading the models "
                     "(killed: out of memory? a GPU driver crash?); stopping the worker with exit status %d "
                     "so that its orchestrator restarts it with back-off", settings.worker_max_load_deaths,
                     LOAD_DEATHS_EXIT_STATUS)
        # what a SIGTERM does (celery.apps.worker), with our status: pool processes running a job
        # hand it back (on_shutting_down), and the consumer's loop, which checks should_stop at
        # least once a second, raises WorkerShutdown, which the worker exits with
        signals.worker_shutting_down.send(sender=hostname, sig="load deaths", how="Warm",
                                          exitcode=LOAD_DEATHS_EXIT_STATUS)
        state.should_stop = LOAD_DEATHS_EXIT_STATUS

    threading.Thread(target=wait, name="load-deaths", daemon=True).start()


def _pool_size() -> int:
    # loads of sibling pool processes under way count too: with N processes, N-1 of them are
    # not deaths (the prefork parent's concurrency, inherited over the fork)
    try:
        return max(1, int(getattr(_giveup["controller"], "concurrency", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _give_up(died: int) -> None:
    """In a pool process: tell the main process to stop the worker, then end this process without
    loading (it would only die as its predecessors did, or take jobs of a worker that stops)."""
    write = _giveup["write"]
    if write is None or os.getpid() == _giveup["main_pid"]:
        return
    log.critical("%d pool processes of this worker died in a row while loading the models (killed: out "
                 "of memory? a GPU driver crash?); the worker stops", died)
    try:
        os.write(write, b"x")
    except OSError:
        log.debug("could not tell the main process", exc_info=True)
        return
    # not at once: the main process would only start another pool process that does the same.
    # It starts its shutdown within a second (its consumer's loop), then waits for this one
    time.sleep(GIVE_UP_WAIT_S)
    os._exit(LOAD_DEATHS_EXIT_STATUS)


def _loading_key(node: str) -> str:
    # not under "worker:": /health reads every aa:worker:* key as a heartbeat. Per worker (its main
    # process), as the stopping mark is: per node name, two workers of one name on one machine
    # that started within the seconds their main processes take to import torch each cleared the
    # count, then counted the other's load as a death, and one stopped with status 1
    from worker.lease import host_id

    return JobStore.from_settings().key("loading", node, f"{host_id()}:{_main['pid'] or os.getpid()}")


def _count_load(node: str) -> int:
    """This process's load counted among its worker's unfinished ones: how many were before it."""
    try:
        client = JobStore.from_settings().redis
        with client.pipeline(transaction=True) as pipe:
            pipe.incr(_loading_key(node))
            pipe.expire(_loading_key(node), LOAD_DEATHS_WINDOW_S)
            before = int(pipe.execute()[0]) - 1
    except Exception:  # noqa: BLE001 - Redis away: announced as before
        log.debug("could not count the model load", exc_info=True)
        return 0
    return before


def _load_ended(node: str) -> None:
    try:
        JobStore.from_settings().redis.delete(_loading_key(node))
    except Exception:  # noqa: BLE001 - it lapses after LOAD_DEATHS_WINDOW_S
        log.debug("could not clear the model load count", exc_info=True)


@signals.worker_process_init.connect
def boot(sender: str | None = None, runs_passes: bool = True, **_: Any) -> None:
    _state["name"] = _process_name(str(sender or socket.gethostname()))
    _state["runs_passes"] = runs_passes
    node = str(sender or socket.gethostname())
    loads = get_settings().worker_load_models
    if loads:
        died = max(0, _count_load(node) - (_pool_size() - 1))
        most = get_settings().worker_max_load_deaths
        if most > 0 and died >= most:
            _give_up(died)
        if died >= MAX_LOAD_DEATHS:
            _state["announce_while_loading"] = False
            log.critical("%d pool processes of this worker died while loading the models (killed: out of "
                         "memory?); its queues are announced only once this one's load succeeded", died)
    # the heartbeat thread starts before the models load: while they do, it announces the queues
    # (a worker still loading can take a synchronous call: its job runs once they are loaded),
    # and once the load ended, it heartbeats as before, with the load_error if it failed
    stop = _state["stop"]
    thread = threading.Thread(target=_heartbeat_loop, args=(stop,), name="heartbeat", daemon=True)
    thread.start()
    _state["thread"] = thread
    if get_settings().worker_load_models:
        from engine.core import get_engine

        started = time.perf_counter()
        try:
            get_engine().load_models()
            telemetry.set_model_load_time(time.perf_counter() - started)
            log.info("models loaded on %s in %.1fs", get_engine().model_device, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - keep serving; jobs report ModelError, /health shows it
            _state["load_error"] = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")
        _load_ended(node)
    _state["booted"].set()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def shutdown(**_: Any) -> None:
    _state["stop"].set()
    try:
        store = JobStore.from_settings()
        store.forget_worker(worker_name())
    except Exception:  # noqa: BLE001
        log.debug("could not remove heartbeat", exc_info=True)
