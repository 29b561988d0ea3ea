"""The job interface beyond submitting one file: batches, status, result, list, cancel."""

from __future__ import annotations

import functools
import json
import inspect
from typing import Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from api.deps import BaseUrlDep, DispatcherDep, IdempotencyKeyDep, Principal, PrincipalDep, SettingsDep, require_api_key
from api.dispatch import Dispatcher, summary_view, view, view_json
from api.errors import JobConflict, not_found
from api.forms import WEBHOOK_FIELDS, form_parameters, several_files, with_signature
from api.idempotency import Idempotent, IdempotencyKey, sent_fields
from api.limits import BoundedFormRoute
from api.models import ERRORS, Batch, Job, JobList
from api.routes.analyses import ACCEPTED_HEADERS, SUBMIT_DEPENDENCIES, accepted_headers
from api.routes.analyses import jobs as router
from shared.errors import InputError
from shared.formats import FORMATS, FormatName, file_stem, own_stem
from shared.jobs import STATES, SUCCEEDED, JobRecord, Quota, Status, is_job_id, new_job_id
from shared.kinds import KINDS, JobKind, KindName, get_kind

batches = APIRouter(prefix="/batches", tags=["jobs"], dependencies=[Depends(require_api_key)], responses=ERRORS,
                    route_class=BoundedFormRoute)

# kinds with one audio upload, whose parameters apply to every file of a batch
BATCH_KINDS: dict[str, JobKind] = {k.name: k for k in KINDS.values() if k.batch}
BatchKind = Literal[tuple(BATCH_KINDS)]  # type: ignore[valid-type]


def _batch_form_fields() -> list[inspect.Parameter]:
    # every batch kind's form fields, each named once; the chosen kind's model validates them
    seen: dict[str, Any] = {}
    for kind in BATCH_KINDS.values():
        for name, field in kind.form_fields.items():
            seen.setdefault(name, field)
    return form_parameters(seen.items())


async def submit_batch(*, request: Request, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep,
                       idempotency_key: IdempotencyKeyDep, kind: str, files: list[UploadFile],
                       webhook_url: str | None = None, webhook_payload: str | None = None,
                       **values: Any) -> JSONResponse:
    """One job per file (each with its own webhook delivery); the batch groups them for polling."""
    if not files:
        raise InputError("files: at least one file is required")
    job_kind = BATCH_KINDS[kind]
    # the route takes every batch kind's fields, but each kind reads its own: another kind's field
    # was dropped without a word (kind=identify with diarization's identification_threshold=0.9
    # ran at the default threshold, and named speakers the client had asked to be stricter about)
    foreign = sorted(name for name, value in values.items()
                     if name not in job_kind.form_fields and value is not None and value != "")
    if foreign:
        raise InputError(f"{', '.join(foreign)}: not a parameter of {kind} jobs, which take "
                         f"{', '.join(job_kind.form_fields) or 'no parameters'}")
    form = {name: values.get(name) for name in job_kind.form_fields}
    # a tenant at its quota hears it before any file's header is read (below: up to 3 s of a
    # sandboxed FFmpeg's CPU a file, 1,000 files a batch); submit_all's checks stay the ones that hold
    await _refuse_over_quota(dispatcher, principal, idempotency_key, [upload.size or 0 for upload in files])
    webhook_url = await dispatcher.check_webhook(webhook_url, principal)
    batch_id = new_job_id()
    # All or nothing: every file is read and its header checked before any job exists. A batch
    # refused at its third file had queued (and run) the first two, whose ids the client, told
    # only of the refusal, never learnt: a retry ran them twice.
    submissions = await dispatcher.read_batch(job_kind, files, form, principal)
    # each file is a job of its own, held to the limit on its own: with one budget for the whole
    # batch, two 13 h recordings (each within a 24 h limit) were refused as 26 h "together"
    for submission in submissions:
        await dispatcher.check_audio_limits(submission.audio.values(), sync=False, of_several=len(submissions) > 1,
                                            owner=principal.owner)
    # stored, queued and confirmed together: refused midway all the same (storage full, job store
    # or broker gone), what was queued is withdrawn; cut off midway (the process died), what was
    # queued is failed by the workers' recovery pass (Dispatcher.submit_all)
    idempotent = Idempotent(idempotency_key, "jobs/batch", sent_fields(await request.form())) \
        if idempotency_key else None
    # checked above, every file: not read again as each is stored (each of a batch's headers was
    # read twice, two sandboxed FFmpeg reads a file for a batch of m4a)
    accepted = await dispatcher.submit_all(submissions, webhook_url=webhook_url, webhook_payload=webhook_payload,
                                           batch_id=batch_id, principal=principal, idempotent=idempotent,
                                           checked=True)
    # a batch answered from its key is that batch, under its own id
    body = _batch_body(base, accepted.records[0].batch_id or batch_id, kind, accepted.records)
    return JSONResponse(body, status_code=202, headers=accepted_headers(body["status_url"], accepted))


async def _refuse_over_quota(dispatcher: Dispatcher, principal: Principal, key: IdempotencyKey | None,
                             sizes: list[int]) -> None:
    """429 (413 for a batch alone past the limit) when these uploads would take the tenant past
    its quota now, as ``Dispatcher.submit_all`` answers it once every header was read: a tenant
    over its quota had each batch's headers read (a sandboxed FFmpeg each) only to be refused.
    Not for a key already in use: its retry is answered from the key, never refused by the jobs
    it holds (the key is looked at again, and the quota after it, by submit_all)."""
    if await dispatcher.key_in_use(principal, key):
        return
    await run_in_threadpool(dispatcher.store.check_room, principal.owner, Quota.from_settings(dispatcher.settings),
                            [(new_job_id(), size) for size in sizes])


submit_batch = with_signature(
    submit_batch,
    SUBMIT_DEPENDENCIES,
    [
        inspect.Parameter("kind", inspect.Parameter.KEYWORD_ONLY, annotation=BatchKind,
                          default=Form(..., description="the analysis run on every file")),
        inspect.Parameter("files", inspect.Parameter.KEYWORD_ONLY, annotation=list[UploadFile],
                          default=several_files("one job per file")),
        *_batch_form_fields(),
        *WEBHOOK_FIELDS,
    ],
)
router.add_api_route("/batch", submit_batch, methods=["POST"], status_code=202, response_model=Batch,
                     summary="Submit several files as one batch",
                     responses={202: {"model": Batch, "headers": ACCEPTED_HEADERS, "description": (
                         "queued, one job per file; poll status_url. With an Idempotency-Key already answered: "
                         "that batch again, as it is now (`Idempotent-Replayed: true`)")}})


def _batch_body(base: str, batch_id: str, kind: str, records: list[JobRecord]) -> dict[str, Any]:
    counts = dict.fromkeys(STATES, 0)
    for record in records:
        counts[record.status] += 1
    return {"batch_id": batch_id, "kind": kind, "jobs": [summary_view(r, base) for r in records], "counts": counts,
            "status_url": f"{base}/batches/{batch_id}"}


class JobPage(JobList):
    """GET /jobs: a page of the listing (JobList's fields, and where the next page starts)."""

    count: int = Field(description="jobs on this page")
    limit: int = Field(description="the most jobs a page holds: the limit asked for, cut to "
                       "AUDIO_ANALYSIS_JOBS_LIST_LIMIT (100); the next pages give the rest")
    next_cursor: str | None = Field(
        None, description="pass it as `cursor` (with the same limit and filters) for the next page, or follow "
        "the Link header's rel=\"next\", which names it; null on the last page. A page filtered by status or "
        "kind may hold fewer jobs than limit, even none, and still have one: keep following it until it is null")


_NEXT_PAGE: dict[int | str, dict[str, Any]] = {200: {"headers": {"Link": {
    "description": 'the next page, `<…/jobs?limit=…&cursor=…>; rel="next"` (with the filters asked for); '
                   "absent on the last page", "schema": {"type": "string"}}}}}


@router.get("", response_model=JobPage, summary="Recent jobs, newest first, a page at a time", responses=_NEXT_PAGE)
async def list_jobs(
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    base: BaseUrlDep,
    limit: int = Query(20, ge=1, le=1000, description="jobs on this page, cut to AUDIO_ANALYSIS_JOBS_LIST_LIMIT "
                       "(100: the body's limit says what applied; the next pages give the rest); 422 past 1,000"),
    status: Status | None = Query(None),
    kind: KindName | None = Query(None),
    cursor: str | None = Query(None, max_length=200, description="where the previous page ended: its "
                               "next_cursor (or its Link rel=next)"),
) -> JSONResponse:
    """The caller's own jobs (an admin key: everyone's), each without its result: GET
    /jobs/{id} or /jobs/{id}/result gives it (a listing of finished diarizations was megabytes).
    The next page is ``next_cursor`` in the body and the ``Link`` header's ``rel="next"``; the
    cursor is a place in the listing, so jobs submitted meanwhile neither repeat nor shift it."""
    # cut, as before (clients send limit=1000 and were answered), but no longer silently: the body
    # says the limit that applied, and next_cursor and the Link header name the rest, which a
    # client with 500 jobs could not reach at all
    limit = min(limit, settings.jobs_list_limit)
    # the cursor is bound to its listing's filters (shared.jobs._parse_cursor): 422 with others
    page = await run_in_threadpool(functools.partial(
        dispatcher.store.recent_page, limit, status=status, kind=kind, owner=principal.list_owner, cursor=cursor,
        summaries=True))
    jobs = [summary_view(r, base) for r in page.jobs if principal.can_see(r)]
    headers: dict[str, str] = {}
    if page.next_cursor is not None:
        query = {"limit": limit, "status": status, "kind": kind, "cursor": page.next_cursor}
        headers["Link"] = f'<{base}/jobs?{urlencode({k: v for k, v in query.items() if v is not None})}>; rel="next"'
    return JSONResponse({"jobs": jobs, "count": len(jobs), "limit": limit, "next_cursor": page.next_cursor},
                        headers=headers)


@router.get("/{job_id}", response_model=Job, summary="Status, progress and result of a job")
async def get_job(job_id: str, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep) -> Response:
    # the result sent on as stored, never parsed (view_json), and the rest read and encoded off
    # the event loop: a long diarization's result is megabytes (100,000 turns: 6 MB)
    def body() -> Response:
        record, result = dispatcher.get_split(job_id, principal)
        return Response(view_json(record, result, base), media_type="application/json")

    return await run_in_threadpool(body)


_RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the result in the format asked for: JSON (every kind, the synchronous endpoint's body), "
                       "RTTM, SRT or WebVTT (diarization)",
        "content": {f.media_type.split(";")[0]: {"schema": {"type": "string"}} for f in FORMATS.values()
                    if f.name != "json"} | {"application/json": {"schema": {"type": "object"}}},
    },
    409: {"description": "the job has not succeeded (queued, running, failed or cancelled): no result"},
    422: {"description": "a format the job's kind is not offered in (rttm, srt and vtt: diarization only)"},
}


@router.get("/{job_id}/result", summary="The result of a succeeded job, as JSON, RTTM, SRT or WebVTT",
            responses=_RESULT_RESPONSES, response_class=Response)
async def get_result(
    job_id: str,
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    format: FormatName = Query("json", description="json (every kind); rttm, srt, vtt (diarization)"),  # noqa: A002
) -> Response:
    """The result alone, in the format asked for. SRT and WebVTT cues carry each turn's speaker
    (its identity when one was found); another key's job is 404, like an unknown one."""
    record, result = await run_in_threadpool(dispatcher.get_split, job_id, principal)
    kind = get_kind(record.kind)
    kind.check_format(format)
    if record.status != SUCCEEDED or result is None:
        why = "no result yet" if not record.ended else f"it has no result (GET /jobs/{job_id} shows why)"
        raise JobConflict(f"job {job_id} is {record.status}: {why}")
    if format == "json":
        # as stored: parsing and encoding 8 MB again held the GIL, and with it the event loop
        return Response(result, media_type="application/json")
    # rendered off the event loop, a long one at a time (Dispatcher.render): 100,000 turns took
    # 2.4 s as SubRip, and while a few clients fetched such a result the API answered nobody else
    return await dispatcher.render(principal.owner, len(result), _render_result, kind, record, result, format,
                                   job_id)


def _render_result(kind: JobKind, record: JobRecord, result: str, format: str, job_id: str) -> Response:  # noqa: A002
    spec = FORMATS[format]
    stem = file_stem(record.filename, job_id)
    return Response(
        kind.render(json.loads(result), format, uri=stem), media_type=spec.media_type,
        headers={"Content-Disposition": _disposition(stem, own_stem(record.filename), spec.suffix)},
    )


def _disposition(stem: str, own: str | None, suffix: str) -> str:
    """``filename`` in plain ASCII for every client, and the upload's own name as ``filename*``
    (RFC 6266, RFC 8187's UTF-8 form) where that differs: a result of "会议.wav" downloaded as
    "<job id>.srt", one of "Réunion.wav" as "R_union.srt". Percent-encoded whole, so no byte of
    the client's name can end the header's field or its quotes."""
    header = f'inline; filename="{stem}{suffix}"'
    if own is not None and own != stem:
        header += f"; filename*=UTF-8''{quote(own + suffix, safe='')}"
    return header


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job")
async def cancel_job(job_id: str, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep) -> dict[str, Any]:
    """409 when the job already ended. Its upload is deleted at once."""
    return view(await dispatcher.cancel(job_id, principal), base)


@batches.get("/{batch_id}", response_model=Batch, summary="Status of every job of a batch")
async def get_batch(batch_id: str, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep) -> dict[str, Any]:
    """Every job without its result (GET /jobs/{id}/result gives each), and counts per status."""
    found = await run_in_threadpool(functools.partial(dispatcher.store.batch, batch_id, summaries=True)) \
        if is_job_id(batch_id) else []
    records = [r for r in found if principal.can_see(r)]
    if not records:
        raise not_found("batch", batch_id, "unknown or expired")
    return _batch_body(base, batch_id, records[0].kind, records)


# the router's last route: a POST to /jobs/<a mistyped kind> matched only GET /jobs/{job_id}'s
# path and was answered 405 "Method Not Allowed". Its body is never read.
@router.post("/{kind}", include_in_schema=False)
async def unknown_kind(kind: str) -> None:
    raise not_found("job kind", kind, f"POST /jobs/<kind> takes one of {', '.join(KINDS)}, or /jobs/batch")
