"""What a route may ask for, as typed ``Annotated`` aliases: settings, the job store, the
dispatcher and the caller (API-key auth). Routes declare ``settings: SettingsDep`` instead of
reaching into ``request.app.state``.

Every one is ``async def``: none waits for anything, and FastAPI runs a plain ``def`` dependency
in the thread pool that storage and Redis calls use, so while uploads held its threads (a slow
bucket), a status poll waited seconds for a thread only to compare its key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader
from prometheus_client import CollectorRegistry
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.dispatch import Dispatcher
from api.errors import AuthError, error_response
from api.hosts import host_of
from api.idempotency import HEADER, KEY_MAX_LENGTH, KEY_PATTERN, IdempotencyKey, parse_key
from shared.jobs import JobRecord, JobStore
from shared.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has API keys")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


async def get_registry(request: Request) -> CollectorRegistry:
    return request.app.state.registry


async def base_url(request: Request) -> str:
    """Where this API is reached from the client's side (status_url, Location)."""
    return str(request.base_url).rstrip("/")


@dataclass(frozen=True)
class Principal:
    """Who is asking: every job belongs to the key that created it (its tenant).

    ``owner`` is a digest of the key, never the key itself, so job records in Redis (and their
    backups) do not hold credentials. ``owner`` is None when the service runs without API keys:
    one tenant, everything visible.
    """

    owner: str | None
    admin: bool = False

    def can_see(self, record: JobRecord) -> bool:
        return self.admin or self.owner is None or record.owner == self.owner

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


def authenticate(key: str | None, settings: Settings, *, count: int = 1) -> Principal:
    """Who sends ``key`` (AuthError if nobody with keys on); keys off: everyone, unnamed.
    Compared in constant time. ``count``: how many X-API-Key headers the request carried; more
    than one is refused: the request was served as its first key's, another tenant's perhaps
    (a proxy that adds its own key to a client's), with no sign which one was used."""
    keys, admins = settings.api_keys, settings.admin_api_keys
    if not keys and not admins:
        return Principal(owner=None, admin=False)
    if count > 1:
        raise AuthError(f"X-API-Key given {count} times; send one key")
    if key is None:
        raise AuthError("missing X-API-Key header")
    if _matches(key, admins):
        return Principal(owner=owner_of(key), admin=True)
    if _matches(key, keys):
        return Principal(owner=owner_of(key))
    raise AuthError("invalid API key")


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> Principal:
    """Off unless settings.api_keys (or admin_api_keys) is set."""
    return authenticate(key, request.app.state.settings, count=len(request.headers.getlist("x-api-key")))


class ApiKeyGate:
    """With API keys on, a request that carries a body (POST, PUT, PATCH) without a valid key is
    answered 401 before a byte of its body is read.

    FastAPI parses a route's form before it resolves the route's dependencies, so the key check
    of :func:`require_api_key` came after the whole upload had been received, parsed and spooled
    to disk: anyone could make the API take in a gigabyte a request. Every route with a body
    needs a key (only /health, /metrics, the docs and the web page are open, all GET); the
    dependency still decides who the caller is.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            # the first one, as the dependency reads it (Starlette's headers.get)
            sent = [v for k, v in scope["headers"] if k == b"x-api-key"]
            raw = sent[0] if sent else None
            try:
                authenticate(raw.decode("latin-1") if raw is not None else None, self.settings, count=len(sent))
            except AuthError as exc:
                response = error_response(401, exc.detail, exc.error_type, {"WWW-Authenticate": "X-API-Key"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class QuotaGate:
    """A submission from a tenant already at its quota of unfinished jobs
    (``tenant_max_unfinished_jobs``) is answered 429 before a byte of its body is read, and the
    connection closed: every submission adds a job, so its body cannot change the answer, and
    the whole upload (hundreds of MB) was received and spooled to be refused. The quota's own
    checks (``Dispatcher.submit_all``, ``JobStore.create_queued``) are unchanged: the bytes
    limit needs the body (a part's size is known only once it is read, a ``file_url`` counts 0
    bytes, and a multipart body's preamble and epilogue may be of any length), so a request is
    never refused by its ``Content-Length``. A retry whose ``Idempotency-Key`` is in use is
    passed on, to be answered from its key."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        from shared.kinds import KINDS

        self.app = app
        self.settings = settings
        self.paths = frozenset({"/jobs/batch", *(f"/jobs/{name}" for name in KINDS),
                                *(kind.sync_path for kind in KINDS.values() if kind.sync_path)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.settings.tenant_max_unfinished_jobs \
                and scope["path"] in self.paths:
            refusal = await self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _refusal(self, scope: Scope) -> Response | None:
        from starlette.concurrency import run_in_threadpool

        from shared.errors import QuotaExceeded
        from shared.jobs import Quota, new_job_id

        from api.errors import QUOTA_RETRY_AFTER_S

        sent = [v for k, v in scope["headers"] if k == b"x-api-key"]
        try:
            principal = authenticate(sent[0].decode("latin-1") if sent else None, self.settings, count=len(sent))
            key = parse_key([v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.lower().encode()])
        except Exception:  # noqa: BLE001 - a key refused is the route's to answer, as before
            return None
        dispatcher: Dispatcher = scope["app"].state.dispatcher
        try:
            if await dispatcher.key_in_use(principal, key):
                return None
            # one job of no bytes: refused only where any submission would be
            await run_in_threadpool(dispatcher.store.check_room, principal.owner,
                                    Quota(max_jobs=self.settings.tenant_max_unfinished_jobs), [(new_job_id(), 0)])
        except QuotaExceeded as exc:
            return error_response(exc.status_code, exc.detail, exc.error_type,
                                  {"Retry-After": str(QUOTA_RETRY_AFTER_S)})
        except Exception:  # noqa: BLE001 - the job store out of reach: the route answers as before
            return None
        return None


class CrossSiteGate:
    """A browser's request sent by a page of another site that would change something (POST,
    PUT, PATCH, DELETE) is answered 403 before a byte of its body is read.

    A multipart POST is a "simple" request to a browser: any web page the service's user visits
    could send one without a preflight, and a service without API keys (the default, on a
    workstation or a LAN) took it: a page of another site imported a voiceprint labelled as it
    pleased, which every later ``voiceprints=all`` diarization used to name the speakers, or
    queued jobs by the hundred. Browsers say where a request comes from (``Sec-Fetch-Site``);
    the page at ``/`` and the docs are ``same-origin``, and clients that are not browsers (the
    CLI, scripts, curl) send no such header and are not concerned."""

    UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
    REFUSED = frozenset({b"cross-site", b"same-site"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.UNSAFE:
            site = next((v for k, v in scope["headers"] if k == b"sec-fetch-site"), None)
            site = site.strip().lower() if site is not None else _site_by_origin(scope["headers"])
            if site in self.REFUSED:
                response = error_response(
                    403, f"refused: a page of another site ({site.decode()}) may not send this request",
                    "ValidationError")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _site_by_origin(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Where a request without ``Sec-Fetch-Site`` comes from, by its ``Origin``: browsers that do
    not send the former (Safari before 16.4, a privacy proxy that strips it) still send the
    latter with every cross-origin POST, and a multipart POST from any page of another site
    passed the gate in them. ``b"cross-site"`` when the Origin is another host or port than the
    request's ``Host`` (or ``null``: a sandboxed frame, a ``data:`` or ``file:`` page), else
    ``b""``: no Origin (curl, the CLI, scripts) is no browser's request."""
    origin = next((v for k, v in headers if k == b"origin"), None)
    if origin is None:
        return b""
    scheme, sep, rest = origin.decode("latin-1").strip().partition("://")
    host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1")
    default = _DEFAULT_PORTS.get(scheme.lower())
    if not sep or default is None or host_of(rest) is None or host_of(host) is None:
        return b"cross-site"  # "null", or nothing a page of this API's origin sends

    def port(value: str) -> str:
        tail = value.rsplit("]", 1)[-1]
        return tail.rsplit(":", 1)[1] if ":" in tail else default  # type: ignore[return-value]

    same = host_of(rest) == host_of(host) and port(rest) == port(host)
    return b"" if same else b"cross-site"


async def idempotency_key(
    request: Request,
    _documented: str | None = Header(
        None, alias=HEADER, description="makes a retry safe: the same key (1 to 255 printable ASCII characters, "
        "a UUID say) from the same API key within AUDIO_ANALYSIS_IDEMPOTENCY_WINDOW_S of the first's 202 is answered "
        "that submission's 202 (same job or batch, `Idempotent-Replayed: true`) and runs nothing again; on a "
        "synchronous route, the first's job is waited for and its result answered; reused for another request: "
        "422; while the first is still being submitted: 409 with Retry-After",
        # documented only: parse_key checks the key (FastAPI's check would take one of two keys)
        json_schema_extra={"minLength": 1, "maxLength": KEY_MAX_LENGTH, "pattern": KEY_PATTERN}),
) -> IdempotencyKey | None:
    """The ``Idempotency-Key`` header of a submit (asynchronous or synchronous), validated once (422), or None.
    Read from every value the request carries: FastAPI's parameter (which documents it) would
    take one of two keys sent and drop the other without a word."""
    return parse_key(request.headers.getlist(HEADER))


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
PrincipalDep = Annotated[Principal, Depends(require_api_key)]
BaseUrlDep = Annotated[str, Depends(base_url)]
RegistryDep = Annotated[CollectorRegistry, Depends(get_registry)]
IdempotencyKeyDep = Annotated[IdempotencyKey | None, Depends(idempotency_key)]
