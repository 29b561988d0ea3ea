"""The web page (``/``) and its assets (``/ui/``): plain files from api/web, nothing from outside.

``/docs`` and ``/redoc`` are served the same way, offline. The page is a client of the public job
API like any other. Its Content-Security-Policy allows
this origin only (and the user's own file as a blob for the audio player), so a page served
here cannot load, or send the user's audio to, another host.
"""

from __future__ import annotations

import os
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.staticfiles import NotModifiedResponse
from starlette.types import Scope

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# Swagger UI and ReDoc as files inside the fastapi-offline wheel (maintained with FastAPI's own
# asset versions), rather than 2.8 MB of vendored JavaScript in this repository
DOCS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
CSP = ("default-src 'self'; media-src 'self' blob:; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
# FastAPI's docs pages start Swagger UI / ReDoc from an inline script, and ReDoc links its logo
# from its CDN: the policy lets the inline start-up run and refuses every other host. Never
# framed: Swagger UI's "Try it out" sends requests (a cancel, a delete) with the visitor's key
# field, which a page framing it could click through (clickjacking)
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
# on the page, the docs and every asset: a file is run or styled only as the type it is served
# as (nosniff), never framed (X-Frame-Options for browsers without frame-ancestors), sends no
# Referer elsewhere, and shares no window with a page that opened it
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin"}


class _File(FileResponse):
    """A file whose bad ``Range`` header is answered in the documented error shape.

    Starlette's FileResponse answers a malformed range (400) or one past the end (416) with its
    own plain-text body, the one error of the API that was not ``{"detail", "error_type",
    "timestamp"}``. Raised as an HTTPException instead, before anything is sent, it reaches
    api/errors.py like every other error."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as exc:
            raise HTTPException(400, exc.content) from None
        except RangeNotSatisfiable as exc:
            raise HTTPException(416, f"Range header: the file is {exc.max_size} bytes long",
                                headers={"Content-Range": f"bytes */{exc.max_size}"}) from None


class _Assets(StaticFiles):
    """Static files with :data:`SECURITY_HEADERS`, served as :class:`_File`; with ``policy``, each
    under that Content-Security-Policy too."""

    def __init__(self, *, directory: Path, policy: str | None = None) -> None:
        super().__init__(directory=directory)
        self.policy = policy

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        # StaticFiles.file_response, with _File for FileResponse
        response = _File(full_path, status_code=status_code, stat_result=stat_result)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        if self.policy is not None:
            response.headers["Content-Security-Policy"] = self.policy
        return response


router = APIRouter(include_in_schema=False)
# every file of the page under the page's policy: /ui/index.html is the page itself, and served
# without it (as it was), a link to it ran the page with none of CSP's limits (any script, any
# host to send the user's audio and key to), which a link to / would have had
assets = _Assets(directory=WEB_DIR, policy=CSP)
docs_assets = _Assets(directory=DOCS_DIR)


@router.get("/")
async def page() -> FileResponse:
    return _File(WEB_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache", **SECURITY_HEADERS})


def _with_policy(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    response.headers.update(SECURITY_HEADERS)
    return response


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _with_policy(get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js", swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs-assets/favicon.png",
    ))


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _with_policy(get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/docs-assets/redoc.standalone.js", redoc_favicon_url=f"{root}/docs-assets/favicon.png",
        with_google_fonts=False,
    ))
