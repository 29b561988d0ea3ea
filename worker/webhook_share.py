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
# own retry, or a copy of its message, already holds it) while the tenant holds under the cap. The
# key lives as long as its latest slot, so an idle tenant leaves nothing behind.
_TAKE = """
local key, member = KEYS[1], ARGV[1]
local now, lapses, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= cap then
  return 0
end
redis.call('ZADD', key, lapses, member)
local ttl = redis.call('PTTL', key)
local wanted = math.ceil((lapses - now) * 1000)
if ttl < wanted then redis.call('PEXPIRE', key, wanted) end
return 1
"""


class TenantSlots:
    """The in-flight deliveries of one tenant (``owner``; None: jobs without one)."""

    def __init__(self, jobs: JobStore, owner: str | None) -> None:
        self.jobs = jobs
        self.key = jobs.key("webhooks", "in-flight", owner or "-")

    def take(self, member: str, cap: int, hold_s: float) -> bool:
        """Take (or keep) ``member``'s slot for ``hold_s`` seconds; False when the tenant already
        holds ``cap`` others."""
        now = self.jobs.clock()
        return bool(self.jobs.redis.eval(_TAKE, 1, self.key, member, now, now + hold_s, max(1, math.floor(cap))))

    def give_back(self, member: str) -> None:
        self.jobs.redis.zrem(self.key, member)

    def held(self) -> int:
        """Slots held now (expired ones not counted)."""
        return int(self.jobs.redis.zcount(self.key, self.jobs.clock(), "+inf"))
