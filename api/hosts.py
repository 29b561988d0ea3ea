"""The host names the API answers to (the ``Host`` header): against DNS rebinding.

An API on 127.0.0.1 without API keys (``audio-analysis up``, the default) answers every request
that reaches it. A page on another site cannot read those answers (the browser's same-origin
policy) until its owner re-points the page's own host name at 127.0.0.1 (DNS rebinding): the
page's requests then go to this API with ``Host: attacker.example:8000``, and the browser sees
them, and their answers, as the page's own origin. ``Sec-Fetch-Site`` says ``same-origin`` then,
so :class:`api.deps.CrossSiteGate` lets them through, and the page read ``/jobs``, results and
voiceprints. Refusing the host names this API is not reached by stops it; that is Starlette's
``TrustedHostMiddleware``, Django's and Jupyter's ``ALLOWED_HOSTS``, answered here in the
documented error shape and on by itself where it matters.

Which hosts (``Settings.allowed_hosts``, ``AUDIO_ANALYSIS_ALLOWED_HOSTS``):

- always ``localhost`` and IP addresses (``127.0.0.1:8000``, ``[::1]:8000``, a pod's IP that a
  Kubernetes probe sends): DNS rebinding needs a name whose DNS answer the attacker controls, and
  a browser sends an address as ``Host`` only to that very address;
- the names listed (``api.example.com``; ``*.example.com`` for its subdomains; a port is
  ignored); ``["*"]``: any host, no check;
- nothing listed (the default): the API answers other names only where the check has nothing to
  protect or would break deployments. It refuses them on a connection that arrived on a loopback
  address, of an API that listens on a loopback address (``api_host``: ``python -m api.serve``
  puts its ``--host`` there) and has no API keys. An API that listens on 0.0.0.0 (compose,
  Kubernetes, behind a load balancer: reached as ``api:8000`` or a public name) answers any host,
  as before; so does one with API keys, whose data a rebound page cannot read without a key (the
  page at ``/`` keeps it in the real origin's storage); and so does an app that no socket serves
  (the in-process ``TestClient`` of the tests, whose server is ``testserver``).
"""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from shared.settings import Settings

# host[:port], the host a name or an IP literal (IPv6 in brackets)
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?$")


def host_of(value: str) -> str | None:
    """The host of a ``Host`` header (or of an allowed_hosts entry): lower case, without its port
    or a final dot, an IPv6 address without brackets; None when it is not one."""
    m = _HOST.match(value.strip())
    if m is None:
        return None
    host = (m.group("v6") or m.group("name")).lower()
    return host[:-1] if host.endswith(".") and len(host) > 1 else host


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str | None) -> bool:
    """A bind or socket address on this machine only: localhost, 127.0.0.0/8, ::1."""
    if not host:
        return False  # "" binds every interface, a Unix socket has no host
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostGate:
    """A request whose ``Host`` is not one this API answers to is refused (400), before anything
    else reads it. See the module's docstring for which hosts, and why."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        listed = [h.strip() for h in settings.allowed_hosts if h.strip()]
        self.any_host = "*" in listed
        self.listed = bool(listed)
        self.names = {h for h in (host_of(e) for e in listed if not e.startswith("*.")) if h}
        self.suffixes = tuple("." + h for h in (host_of(e[2:]) for e in listed if e.startswith("*.")) if h)
        # with nothing listed: on only for an API on loopback whose every route is open
        self.auto = is_loopback(settings.api_host) and not settings.api_keys and not settings.admin_api_keys

    def checks(self, scope: Scope) -> bool:
        if self.any_host:
            return False
        if self.listed:
            return True
        server = scope.get("server")
        return self.auto and bool(server) and is_loopback(str(server[0]))

    def allows(self, host: str) -> bool:
        if host == "localhost" or _is_address(host):
            return True
        return host in self.names or host.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.checks(scope):
            # every Host header the request has (a second one is another server's first)
            for value in (v.decode("latin-1") for k, v in scope["headers"] if k == b"host"):
                host = host_of(value)
                if host is None or not self.allows(host):
                    shown = value if len(value) <= 100 else value[:100] + "…"
                    response = error_response(
                        400, f"refused: this API does not answer to the host {shown!r} (a name another site may have "
                             "pointed at this address); reach it as localhost or by its address, or list the name "
                             "in AUDIO_ANALYSIS_ALLOWED_HOSTS", "ValidationError")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
