"""Who runs a job right now: a lease in Redis, held and refreshed while the job runs.

Celery with ``acks_late`` hands a job out again whenever its message was not acked: after the
pool process died (``task_reject_on_worker_lost``), and after the broker's visibility timeout,
even when the first worker is still busy with it. The lease lets the second copy tell the two
apart: a live holder means the job is running elsewhere and must not start twice; a lease whose
holder died stops being refreshed and expires on its own, or is taken over at once when the
holder was a process on this same host that no longer exists.

Built on redis-py's ``Lock`` (atomic set-if-absent, owner token, compare-and-extend).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)


def _pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), "" where it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def pid_namespace_number() -> str:
    """The number of this process's PID namespace ("4026531836"), "" where it cannot be read."""
    return _pid_namespace().removeprefix("pid:[").removesuffix("]")


def host_id() -> str:
    """Where a PID means one process: the hostname and the PID namespace. Containers that share
    a hostname (host networking: Docker's ``network_mode: host``, Kubernetes' ``hostNetwork``)
    each have a namespace of their own, where a PID of the other's names no process or another
    one: by the hostname alone, a live holder in the container beside was taken for dead, its
    lease taken over and its job run twice."""
    return f"{socket.gethostname()}/{_pid_namespace()}"


def owner_token() -> str:
    return f"{host_id()}|{os.getpid()}|{uuid.uuid4().hex}"


def holder_alive(token: str) -> bool:
    """False only when the holder provably died: a process of this host and PID namespace that
    no longer exists.

    A holder elsewhere (another hostname, another PID namespace, a token of an earlier release,
    which named the hostname alone) is trusted until its lease expires.
    """
    try:
        host, pid, _ = token.split("|", 2)
        pid_number = int(pid)
    except ValueError:
        return True
    if host != host_id() or not _pid_namespace():
        return True
    if pid_number == os.getpid():
        return False  # this very process holds no job while it is asking for one
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLease:
    """``acquire()`` then use as a context manager; refreshed every ``ttl_s / 3`` until exit."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client, self.key, self.ttl_s = client, key, ttl_s
        self.lock = client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        # set when the lease expired under us (the process stalled past ttl_s): the job may be
        # running elsewhere by now, so this attempt stops at its next progress report
        self.lost = False

    def acquire(self) -> str | None:
        """Take the lease. Returns None when taken, else the token of the live holder."""
        holder: str | None = None
        for _ in range(3):
            if self.lock.acquire(token=owner_token()):
                self._refresher = threading.Thread(target=self._refresh, name=f"lease {self.key}", daemon=True)
                self._refresher.start()
                return None
            raw = self.client.get(self.key)
            holder = raw.decode() if isinstance(raw, bytes) else raw
            if holder is None:
                continue  # released between our two calls
            if holder_alive(holder):
                return holder
            log.warning("lease %s: holder %s is gone, taking over", self.key, holder)
            stale = self.client.lock(self.key, timeout=self.ttl_s, thread_local=False)
            stale.local.token = holder.encode()
            try:
                stale.release()  # only if it is still that dead holder's lease
            except LockError:
                pass
        return holder or "unknown"

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:
                log.error("lease %s was lost while the job ran", self.key)
                self.lost = True
                return
            except redis.RedisError as exc:  # a Redis blip: keep the job going, try again
                log.warning("lease %s not refreshed: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        try:
            self.lock.release()
        except (LockError, redis.RedisError):
            pass  # expired or Redis gone: it lapses by itself

    def __enter__(self) -> "JobLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
