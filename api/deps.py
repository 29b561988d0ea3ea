"""Request-scoped access to what the app holds (settings, job store, storage) and API-key auth."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from api.errors import AuthError
from shared.jobs import JobStore
from shared.settings import Settings
from shared.storage import Storage

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has API keys")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


@dataclass(frozen=True)
class Principal:
    """Who is asking: every job belongs to the key that created it (its tenant).

    ``owner`` is a digest of the key, never the key itself, so job records in Redis (and their
    backups) do not hold credentials. ``owner`` is None when the service runs without API keys:
    one tenant, everything visible.
    """

    owner: str | None
    admin: bool = False

    def can_see(self, record: dict[str, Any]) -> bool:
        return self.admin or self.owner is None or record.get("_owner") == self.owner

    @property
    def list_owner(self) -> str | None:
        """The owner whose jobs a listing shows; None means all of them."""
        return None if self.admin else self.owner


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _matches(key: str, keys: list) -> bool:
    # every key compared, in constant time, so timing tells nothing about which one matched
    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), k.get_secret_value().encode())
    return found


def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> Principal:
    """Off unless settings.api_keys (or admin_api_keys) is set; compared in constant time."""
    settings = request.app.state.settings
    keys, admins = settings.api_keys, settings.admin_api_keys
    if not keys and not admins:
        return Principal(owner=None, admin=False)
    if key is None:
        raise AuthError("missing X-API-Key header")
    if _matches(key, admins):
        return Principal(owner=owner_of(key), admin=True)
    if _matches(key, keys):
        return Principal(owner=owner_of(key))
    raise AuthError("invalid API key")
