"""Each tenant's share of the webhook delivery threads.

A delivery holds its thread for the whole attempt: a receiver that takes the connection and never
answers holds it for ``webhook_deadline_s`` (30 s), on every attempt. With a fixed number of
threads (8 in compose, Kubernetes and ``up``), one tenant (API key) whose receivers hang held all
of them, and every other tenant's deliveries waited behind its: measured with 2 threads and a 2 s
deadline, another tenant's delivery took 0.2 s alone, 4.7 s behind 8 hanging deliveries, 11.6 s
behind 20.

So a delivery first takes one of its tenant's slots, at most ``webhook_tenant_max_in_flight`` of
them at once (by default half this worker's threads, at least 1); one over the cap is deferred
by the task (sent again after a short countdown, not counted as an attempt, never dropped).

The slots are a sorted set in Redis per tenant, one member per delivery task whose score is the
time its slot lapses by itself (the attempt's deadline and a margin, by the Redis server's
clock): the cap holds across every webhook worker sharing the tenant's load, and a worker killed
mid-POST (SIGKILL, OOM, a lost host) leaks its slot only until then. Jobs without an owner (the
service without API keys) are one tenant.
"""

from __future__ import annotations

import math
import random
from typing import Any

from celery import signals

from shared.jobs import JobStore

# this worker's controller (its WorkController), kept as it starts (worker_init); None where the
# delivery runs outside a worker (``deliver_webhook.apply``, in the tests): no pool to share.
# Its concurrency is read when a delivery asks, not copied at worker_init: ``--concurrency auto``
# is resolved only after worker_init, and a prefork child is forked after that but before
# worker_ready, so a copied value stayed None in every prefork child and such a webhook worker
# ran with no tenant cap at all (its pool processes inherit the controller, resolved, over the fork)
_worker: dict[str, Any] = {"controller": None}


@signals.worker_init.connect
def _note_controller(sender: Any = None, **_: Any) -> None:
    _worker["controller"] = sender


def _worker_concurrency() -> int | None:
    threads = getattr(_worker["controller"], "concurrency", None)
    return threads if isinstance(threads, int) and threads > 0 else None


def tenant_cap(configured: int | None, threads: int | None = None) -> int | None:
    """How many deliveries of one tenant may be in flight at once: ``configured`` when set (0:
    no cap), else half of ``threads`` (this worker's), at least 1; None: no cap."""
    if configured is not None:
        return configured or None
    threads = _worker_concurrency() if threads is None else threads
    return None if threads is None else max(1, threads // 2)


# expired slots dropped first (a killed worker's), then this delivery's slot taken (or kept: its
# own retry, or a copy of its message, already holds it) while the tenant holds under the cap, and
# its entry among the tenant's deferred deliveries dropped. Refused, it answers how many of the
# tenant's deliveries wait deferred (expired entries dropped first). The keys live as long as
# their latest entry, so an idle tenant leaves nothing behind.
_TAKE = """
local key, waiting, member = KEYS[1], KEYS[2], ARGV[1]
local now, lapses, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= cap then
  redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now)
  return {0, redis.call('ZCARD', waiting)}
end
redis.call('ZADD', key, lapses, member)
local ttl = redis.call('PTTL', key)
local wanted = math.ceil((lapses - now) * 1000)
if ttl < wanted then redis.call('PEXPIRE', key, wanted) end
redis.call('ZREM', waiting, member)
return {1, 0}
"""

_WAIT = """
local waiting, member, now, lapses = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', waiting, lapses, member)
local ttl = redis.call('PTTL', waiting)
local wanted = math.ceil((lapses - now) * 1000)
if ttl < wanted then redis.call('PEXPIRE', waiting, wanted) end
return 1
"""


def defer_countdown(defer_s: float, waiting: int, cap: int, looks: float) -> float:
    """How long a delivery deferred for its tenant's cap waits before it looks again: between half
    and the whole of ``defer_s``, times the tenant's deferred deliveries (``waiting``, this one
    included) over ``cap`` x ``looks``, when more. So the tenant's deferred deliveries look again
    about ``cap`` x ``looks`` / ``defer_s`` times a second in all, however many wait. At a fixed
    second each, a tenant's 2,000 deliveries to receivers that hang came back 2,000 times a second,
    more than a 2-thread worker could take: every other tenant's delivery queued behind them
    (28.8 s; 0.1 s behind 10), and the worker did nothing but defer."""
    spread = max(1.0, waiting / max(1.0, cap * looks))
    return defer_s * random.uniform(0.5, 1.0) * spread


class TenantSlots:
    """The in-flight deliveries of one tenant (``owner``; None: jobs without one)."""

    def __init__(self, jobs: JobStore, owner: str | None) -> None:
        self.jobs = jobs
        self.key = jobs.key("webhooks", "in-flight", owner or "-")
        self.waiting_key = jobs.key("webhooks", "deferred", owner or "-")
        self.waiting = 0  # the tenant's deferred deliveries, as the last refused take() saw them

    def take(self, member: str, cap: int, hold_s: float) -> bool:
        """Take (or keep) ``member``'s slot for ``hold_s`` seconds; False when the tenant already
        holds ``cap`` others (``waiting`` then says how many of its deliveries wait deferred)."""
        now = self.jobs.clock()
        taken, waiting = self.jobs.redis.eval(_TAKE, 2, self.key, self.waiting_key, member, now, now + hold_s,
                                              max(1, math.floor(cap)))
        self.waiting = int(waiting)
        return bool(taken)

    def wait(self, member: str, hold_s: float) -> None:
        """Count ``member`` among the tenant's deferred deliveries for ``hold_s`` seconds (its
        countdown and a margin: a worker killed while holding it leaves it only till then)."""
        now = self.jobs.clock()
        self.jobs.redis.eval(_WAIT, 1, self.waiting_key, member, now, now + hold_s)

    def give_back(self, member: str) -> None:
        self.jobs.redis.zrem(self.key, member)

    def held(self) -> int:
        """Slots held now (expired ones not counted)."""
        return int(self.jobs.redis.zcount(self.key, self.jobs.clock(), "+inf"))
