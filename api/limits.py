"""Refuse oversized uploads before reading them.

A declared Content-Length over the limit is answered 413 at once. Bodies without one (chunked)
are parsed by Starlette into temporary files on disk, never memory, and the copy into storage
stops at the limit (``LocalStorage.save``), which also answers 413.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                response = error_response(
                    413, f"request body is larger than the limit of {self.max_bytes} bytes", "ValidationError"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
