"""A seventeenth round against tenancy, voiceprints and identification (after
tests/test_hostile_*.py, test_voiceprints.py, test_tenant_quota.py).

Each test fails on the code before its fix:

* a key that imported a voiceprint and deleted it, in a loop, left behind a "deleted" marker per
  cycle (``<prefix>:voiceprint-deleted:<id>``, 104 bytes, for a day): the per-key cap of
  10,000 voiceprints, there so that one key cannot fill the Redis every tenant's jobs live in,
  bounded nothing, since none was ever kept. 300 cycles took 8.6 s through the in-process API
  on this machine: a day of one client at that pace is 3 million markers, 0.3 GB. The marker is
  what keeps a retried *enrolment* from storing its deleted voiceprint again (round 15), and
  only an enrolment's id can be stored again; an import's never is.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pytest
from pydantic import SecretStr

PREFIX = "aa-round17t"
KEY_A, KEY_B = "round17-tenant-a-0123456789", "round17-tenant-b-0123456789"
A, B = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
INFO_KEYS = {"id", "label", "model", "dimension", "speech_seconds", "files", "narrowband", "created_at"}


@pytest.fixture(scope="module")
def own_settings(settings) -> Any:
    return settings.model_copy(update={
        "redis_key_prefix": PREFIX, "queue_name": "audio-round17t", "webhook_queue_name": "webhooks-round17t",
        "api_keys": [SecretStr(KEY_A), SecretStr(KEY_B)]})


@pytest.fixture(scope="module")
def redis_raw(own_settings) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(own_settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def bare_api(own_settings, redis_raw) -> Iterator[Any]:
    """The API in-process on the session's Redis under a key prefix of its own, with two API
    keys; no worker (imports, listings and deletes need none)."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    def drop() -> None:
        for key in redis_raw.scan_iter(match=f"{PREFIX}:*", count=1000):
            redis_raw.delete(key)
        redis_raw.delete("audio-round17t", "webhooks-round17t")

    drop()
    with TestClient(create_app(own_settings), raise_server_exceptions=False) as client:
        yield client
    drop()


def _vector(seed: int, dimension: int = 192) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(dimension)
    return (v / np.linalg.norm(v)).tolist()


def _import(api: Any, headers: dict[str, str], label: str, seed: int, model: str) -> Any:
    return api.post("/voiceprints/import", headers=headers, data={"label": label, "model": model},
                    files={"file": ("v.json", json.dumps(_vector(seed)).encode(), "application/json")})


# --- an import deleted leaves nothing behind ------------------------------------------------------

def test_importing_and_deleting_in_a_loop_leaves_nothing_behind(bare_api, redis_raw, own_settings) -> None:
    from shared.voiceprints import embedding_model

    model = embedding_model(own_settings).name
    for seed in range(20):
        r = _import(bare_api, A, "Loop", seed, model)
        assert r.status_code == 201, r.text
        # the new private field is not shown
        assert set(r.json()) == INFO_KEYS, r.json()
        voiceprint_id = r.json()["id"]
        assert set(bare_api.get(f"/voiceprints/{voiceprint_id}", headers=A).json()) == INFO_KEYS
        exported = bare_api.get(f"/voiceprints/{voiceprint_id}/export", headers=A).json()
        assert set(exported) == INFO_KEYS | {"format", "embedding"}, exported
        assert bare_api.delete(f"/voiceprints/{voiceprint_id}", headers=A).status_code == 204
        assert bare_api.get(f"/voiceprints/{voiceprint_id}", headers=A).status_code == 404
    # before: 20 markers, one per cycle, each kept for a day
    left = list(redis_raw.scan_iter(match=f"{PREFIX}:voiceprint-deleted:*", count=1000))
    assert left == [], f"{len(left)} deleted-voiceprint markers kept for imports"
    assert bare_api.get("/voiceprints", headers=A).json() == {"voiceprints": [], "count": 0}
