"""Voiceprints: enroll a person (``POST /voiceprints`` runs the ``enroll`` job kind on a worker,
as the synchronous routes do, and stores the result), list, read, delete, export and import.

A voiceprint belongs to the API key that created it; any other key is answered 404, exactly as
for an unknown id (an admin key reads and deletes any by id). Diarization and ``identify`` jobs
name voiceprints by id (``voiceprints=vp_...,vp_...`` or ``all``), resolved in
``Dispatcher.read``.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import BaseUrlDep, DispatcherDep, IdempotencyKeyDep, PrincipalDep, SettingsDep, require_api_key
from api.errors import not_found
from api.forms import optional_form, refuse_foreign, refuse_repeated, several_files
from api.idempotency import Idempotent, sent_fields
from api.limits import BoundedFormRoute
from api.models import ERRORS
from shared.errors import ModelError
from shared.kinds import ENROLL
from shared.voiceprints import (FORMAT, Voiceprint, deleted_since, embedding_model, enrolled_id, enrolment_job_id,
                                parse_import, to_npy)

router = APIRouter(prefix="/voiceprints", tags=["voiceprints"], dependencies=[Depends(require_api_key)],
                   responses=ERRORS, route_class=BoundedFormRoute)


class VoiceprintInfo(BaseModel):
    id: str
    label: str
    model: str = Field(description="embedding model of the vector")
    dimension: int
    speech_seconds: float | None = Field(description="speech it was computed from (null: imported as a bare vector)")
    files: int | None = Field(description="recordings averaged (null: imported as a bare vector)")
    narrowband: bool | None = Field(
        None, description="enrolled from telephone recordings only (every file at 8 kHz or less): a telephone "
        "recording is matched against it at the model's narrowband identification threshold; null: not known "
        "(enrolled or exported before this field, or a bare vector imported), matched as a microphone voiceprint")
    created_at: str


class VoiceprintList(BaseModel):
    voiceprints: list[VoiceprintInfo]
    count: int = Field(description="voiceprints on this page")


class VoiceprintExport(VoiceprintInfo):
    format: Literal["audio-analysis/voiceprint-v1"] = FORMAT
    embedding: list[float] = Field(description="L2-normalised vector")


def _get(dispatcher: Any, voiceprint_id: str, principal: Any) -> Voiceprint:
    vp = dispatcher.voiceprints.get(voiceprint_id, principal.owner, admin=principal.admin)
    if vp is None:
        raise not_found("voiceprint", voiceprint_id)
    return vp


@router.post("", status_code=201, response_model=VoiceprintInfo, summary="Enroll a person: store a voiceprint")
async def create_voiceprint(
    request: Request,
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep,
    files: list[UploadFile] = several_files(f"one or more recordings of the person (1 to {ENROLL.files[0].max_count})"),
    label: str = Form(..., description="the person's name, as diarization and identify will report it"),
) -> JSONResponse:
    """Embeds the speech of every file on a worker (the ``enroll`` job kind, waited for like the
    synchronous routes), averages the vectors weighted by speech and stores the L2-normalised
    result. 422 when the files hold less speech than ``voiceprint_min_speech_s`` together."""
    await refuse_repeated(request, ["label"])
    # a job route's field (webhook_url: an enrollment is answered when done, never by webhook;
    # num_speakers, voiceprints) was dropped without a word, as rounds 7 and 12 found elsewhere
    await refuse_foreign(request, ["files", "label"])
    submission = await dispatcher.read(ENROLL, {"files": files}, {"label": label}, principal)
    # with an Idempotency-Key a retry waits for the first's job and is answered its voiceprint
    # (one per job: enrolled_id), as the synchronous routes are answered their job's result
    idempotent = Idempotent(idempotency_key, "voiceprints", sent_fields(await request.form())) \
        if idempotency_key else None
    # a key with no room left hears it before a worker embeds its files (not a retry: the room
    # may be full of the very voiceprint it is to be answered)
    if not await dispatcher.key_in_use(principal, idempotency_key):
        await run_in_threadpool(dispatcher.voiceprints.check_room, principal.owner)
    record = await dispatcher.run_sync(submission, principal, request, idempotent=idempotent)
    result = record.result or {}
    if "embedding" not in result:
        # a retry answered the job's result after its voiceprint was deleted, and the vector
        # with it (delete_voiceprint)
        raise deleted_since(enrolled_id(record.job_id))
    expected = embedding_model(settings)
    if result.get("model") != expected.name or result.get("dimension") != expected.dimension:
        raise ModelError(f"the worker embeds with {result.get('model')!r}, this API expects {expected.name!r}: "
                         "API and workers must run the same AUDIO_ANALYSIS_MODEL_PROFILE")
    vp = await run_in_threadpool(
        dispatcher.voiceprints.create, owner=principal.owner, label=result["label"], model=expected,
        embedding=result["embedding"], speech_seconds=result["speech_seconds"], files=len(result["file_speech_seconds"]),
        # a worker from before the field answers none: not known
        narrowband=result["narrowband"] if isinstance(result.get("narrowband"), bool) else None,
        voiceprint_id=enrolled_id(record.job_id),
    )
    headers = {"Location": f"/voiceprints/{vp.id}"}
    if getattr(request.state, "idempotent_replayed", False):
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(vp.public(), status_code=201, headers=headers)


_NEXT_PAGE: dict[int | str, dict[str, Any]] = {200: {"headers": {"Link": {
    "description": 'the next page, `<…/voiceprints?limit=…&cursor=…>; rel="next"`; absent on the last page',
    "schema": {"type": "string"}}}}}


@router.get("", response_model=VoiceprintList, summary="This API key's voiceprints, oldest first, a page at a time",
            responses=_NEXT_PAGE)
async def list_voiceprints(
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    base: BaseUrlDep,
    limit: int = Query(100, ge=1, le=1000, description="voiceprints on this page"),
    cursor: str | None = Query(None, max_length=200, description="where the previous page ended: its Link rel=next"),
) -> JSONResponse:
    """A page of the caller's voiceprints without their vectors; the next page, if any, is the
    ``Link`` header's ``rel="next"`` (the body keeps its original shape). Bounded because a key may
    keep 10,000 voiceprints, and listing them all read 43 MB out of Redis each time."""
    page = await run_in_threadpool(dispatcher.voiceprints.page, principal.owner, limit, cursor)
    found = [vp.model_dump(mode="json") for vp in page.voiceprints]
    headers: dict[str, str] = {}
    if page.next_cursor is not None:
        headers["Link"] = f'<{base}/voiceprints?{urlencode({"limit": limit, "cursor": page.next_cursor})}>; rel="next"'
    return JSONResponse({"voiceprints": found, "count": len(found)}, headers=headers)


@router.post("/import", status_code=201, response_model=VoiceprintInfo, summary="Store a voiceprint from a file")
async def import_voiceprint(
    request: Request,
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    file: UploadFile = File(..., description="a voiceprint exported as JSON, or a bare vector (.npy or JSON array)"),
    label: str | None = optional_form("the person's name (required for a bare vector; overrides the file's)"),
    model: str | None = optional_form("embedding model of a bare vector (required for one)"),
) -> JSONResponse:
    """JSON or ``.npy`` only, never a pickle; the vector must come from this service's embedding
    model (422 otherwise: vectors of two models are not comparable)."""
    await refuse_repeated(request, ["file", "label", "model"])
    await refuse_foreign(request, ["file", "label", "model"])
    data = await file.read(1024 * 1024 + 1)
    await file.close()
    parsed = await run_in_threadpool(parse_import, data, file.filename, label=label, model=model,
                                     expected=embedding_model(settings))
    vp = await run_in_threadpool(
        dispatcher.voiceprints.create, owner=principal.owner, label=parsed.label, model=embedding_model(settings),
        embedding=parsed.embedding, speech_seconds=parsed.speech_seconds, files=parsed.files,
        narrowband=parsed.narrowband,
    )
    return JSONResponse(vp.public(), status_code=201, headers={"Location": f"/voiceprints/{vp.id}"})


@router.get("/{voiceprint_id}", response_model=VoiceprintInfo, summary="One voiceprint (without its vector)")
async def get_voiceprint(voiceprint_id: str, dispatcher: DispatcherDep, principal: PrincipalDep) -> dict[str, Any]:
    return (await run_in_threadpool(_get, dispatcher, voiceprint_id, principal)).public()


@router.get(
    "/{voiceprint_id}/export", summary="The voiceprint as JSON (with label and model) or .npy (the vector)",
    response_model=VoiceprintExport,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "JSON, or .npy with format=npy"}},
)
async def export_voiceprint(voiceprint_id: str, dispatcher: DispatcherDep, principal: PrincipalDep,
                            format: Literal["json", "npy"] = Query("json")) -> Response:  # noqa: A002
    vp = await run_in_threadpool(_get, dispatcher, voiceprint_id, principal)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", vp.label).strip("._") or vp.id
    if format == "npy":
        headers = {"Content-Disposition": _disposition(stem, vp.label, ".npy"),
                   "X-Voiceprint-Model": vp.model, "X-Voiceprint-Dimension": str(vp.dimension)}
        return Response(to_npy(vp), media_type="application/octet-stream", headers=headers)
    return JSONResponse(vp.export(), headers={"Content-Disposition": _disposition(stem, vp.label, ".json")})


def _disposition(stem: str, label: str, suffix: str) -> str:
    """``filename`` in plain ASCII for every client, and the person's name as ``filename*`` (RFC
    6266, RFC 8187's UTF-8 form) where it differs, as a job's result offers its upload's name:
    a voiceprint of "李雷" was saved as "vp_<id>.json" and one of "Zoë" as "Zo_.json". The label
    is one line of printable text (``clean_label``), percent-encoded whole, and a "/" in it
    becomes "_" as in the plain name, so no byte of it can end the header's field or name a
    folder."""
    header = f'attachment; filename="{stem}{suffix}"'
    own = label.replace("/", "_").replace("\\", "_")
    if own != stem:
        header += f"; filename*=UTF-8''{quote(own + suffix, safe='')}"
    return header


@router.delete("/{voiceprint_id}", status_code=204, summary="Delete a voiceprint")
async def delete_voiceprint(voiceprint_id: str, dispatcher: DispatcherDep, principal: PrincipalDep) -> Response:
    deleted = await run_in_threadpool(dispatcher.voiceprints.delete, voiceprint_id, principal.owner,
                                      admin=principal.admin)
    if deleted is None:
        raise not_found("voiceprint", voiceprint_id)
    if deleted.enrolled is not False:
        # the enrolment's job result holds the same vector for as long as the record lives (a
        # day): GET /jobs/{id} read a deleted person's voiceprint back until then
        await run_in_threadpool(dispatcher.store.drop_from_result, enrolment_job_id(deleted.id), "embedding",
                                kind=ENROLL.name, owner=deleted.owner)
    return Response(status_code=204)

