"""Request-scoped access to what the app holds (settings, job store, storage) and API-key auth."""

from __future__ import annotations

import hmac

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


def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """Off unless settings.api_keys is set; compared in constant time."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if key is None:
        raise AuthError("missing X-API-Key header")
    if not any(hmac.compare_digest(key.encode(), k.get_secret_value().encode()) for k in keys):
        raise AuthError("invalid API key")
