"""The worker's Celery application (``celery -A worker.celery_app worker``): the one in
shared/queue.py with the task code included and the worker's signal handlers registered."""

from __future__ import annotations

from shared.lifeline import follow_parent
from shared.queue import make_celery


def _survive_broker_loss_with_unacked_messages() -> None:
    """Keep a worker alive when its connection to Redis is lost while it holds unacked messages.

    Celery 5.7's consumer, on a lost broker connection, first ``collect()``s the connection (which
    detaches its transport: ``transport.client = None``) and then ``close()``s it; the close
    closes the default channel a second time, and with messages still unacked (a webhook's retry
    waiting out its countdown, a job's copy waiting for the running one) the channel restores
    them, building a Redis pool from the detached transport: ``AttributeError: 'NoneType' object
    has no attribute 'hostname'``, which is no connection error, so the worker logged
    "Unrecoverable error" and exited (status 1; under ``up`` that stopped the whole service).
    Seen with a redis-server restarted for 2 s.

    Here the detached transport answers as an unreachable Redis does, with a ``ConnectionError``,
    which Celery ignores as it reconnects. The messages stay in Redis's unacked set, as they would
    have with Redis still down; what they stood for is recovered without them (a delivery past
    its due time, a job whose lease lapsed: worker/recovery.py), and the broker hands them out
    again after its visibility timeout, when they find their job settled."""
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "_detached_is_unreachable", False):
        return

    def _connparams(self, asynchronous: bool = False):  # type: ignore[no-untyped-def]
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed (reconnecting)")
        return original(self, asynchronous=asynchronous)

    _connparams._detached_is_unreachable = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams


_survive_broker_loss_with_unacked_messages()
# a worker or Flower started by `audio-analysis up` ends with it (before any pool process forks)
follow_parent()

app = make_celery(include=["worker.tasks"])

# make `celery -A worker.celery_app` find the signal handlers
import worker.lifecycle  # noqa: E402,F401

# the main process's loop stamps its progress for the pool processes' heartbeat (worker/lifecycle.py)
app.steps["consumer"].add(worker.lifecycle.MainLoopStamp)
