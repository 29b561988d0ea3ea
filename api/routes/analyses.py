"""The routes of every job kind, derived from shared/kinds.py: ``POST /jobs/<kind>`` (202, a job
to poll or a webhook to wait for; each audio upload ``<name>`` may be given as ``<name>_url``
instead) and the original synchronous route (``/diarize`` and friends, uploads only, as the
contract has them), which enqueues the same job and waits for it. A synchronous call made while no
worker could take its job is answered 503 at once, with Retry-After and no job left behind
(Dispatcher.require_worker); a job is queued whatever the workers, to run once one is up."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from api.deps import BaseUrlDep, DispatcherDep, IdempotencyKeyDep, PrincipalDep, require_api_key
from api.dispatch import Accepted, view
from api.forms import WEBHOOK_FIELDS, file_parameters, form_parameters, split, with_signature
from api.idempotency import Idempotent, sent_fields
from api.limits import BoundedFormRoute
from api.models import ERRORS, Job
from shared.kinds import KINDS, JobKind

jobs = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)], responses=ERRORS,
                 route_class=BoundedFormRoute)
synchronous = APIRouter(tags=["synchronous"], dependencies=[Depends(require_api_key)], responses=ERRORS,
                        route_class=BoundedFormRoute)

# a 202's headers (accepted_headers), for the OpenAPI document
ACCEPTED_HEADERS = {
    "Location": {"description": "where to poll: the job's (or batch's) status_url", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when this answers an earlier request made with the same Idempotency-Key (its "
                       "jobs, as they are now); absent otherwise",
        "schema": {"type": "string", "enum": ["true"]}},
}
ACCEPTED = {202: {"model": Job, "headers": ACCEPTED_HEADERS,
                  "description": "queued; poll status_url or wait for the webhook. With an Idempotency-Key "
                                 "already answered: that job again, as it is now (`Idempotent-Replayed: true`)"}}

SYNC_REPLAYED: dict[int | str, dict[str, Any]] = {200: {"headers": {"Idempotent-Replayed": {
    "description": "`true` when this answers an earlier request made with the same Idempotency-Key (its job's "
                   "result: nothing ran again); absent otherwise", "schema": {"type": "string", "enum": ["true"]}}}}}

# what every generated endpoint asks for before its form fields (routes/jobs.py's batch too)
DEPENDENCIES = [
    inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
    inspect.Parameter("dispatcher", inspect.Parameter.KEYWORD_ONLY, annotation=DispatcherDep),
    inspect.Parameter("principal", inspect.Parameter.KEYWORD_ONLY, annotation=PrincipalDep),
    inspect.Parameter("base", inspect.Parameter.KEYWORD_ONLY, annotation=BaseUrlDep),
]
# ... and the asynchronous submits' (routes/jobs.py's batch too): an Idempotency-Key makes a retry safe
SUBMIT_DEPENDENCIES = [
    *DEPENDENCIES,
    inspect.Parameter("idempotency_key", inspect.Parameter.KEYWORD_ONLY, annotation=IdempotencyKeyDep),
]


def accepted_headers(location: str, accepted: Accepted) -> dict[str, str]:
    """A 202's headers: where to poll, and (Stripe's header) whether it answers an earlier request."""
    return {"Location": location, **({"Idempotent-Replayed": "true"} if accepted.replayed else {})}


def _fields(kind: JobKind, *, urls: bool) -> list[inspect.Parameter]:
    return file_parameters(kind, urls=urls) + form_parameters(kind.form_fields.items(), required=True)


def _submit_endpoint(kind: JobKind):
    async def submit(*, request: Request, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep,
                     idempotency_key: IdempotencyKeyDep, **values: Any) -> JSONResponse:
        uploads, urls, form = split(kind, values)
        submission = await dispatcher.read(kind, uploads, form, principal, urls)
        webhook_url = await dispatcher.check_webhook(values.get("webhook_url"), principal)
        idempotent = Idempotent(idempotency_key, f"jobs/{kind.name}", sent_fields(await request.form())) \
            if idempotency_key else None
        accepted = await dispatcher.submit(submission, webhook_url=webhook_url, principal=principal,
                                           webhook_payload=values.get("webhook_payload"), idempotent=idempotent)
        body = view(accepted.record, base)
        return JSONResponse(body, status_code=202, headers=accepted_headers(body["status_url"], accepted))

    submit.__name__ = f"submit_{kind.name}"
    return with_signature(submit, SUBMIT_DEPENDENCIES, _fields(kind, urls=True) + WEBHOOK_FIELDS)


# ... and the synchronous routes': a retry with the key waits for the first's job (Dispatcher.run_sync)
SYNC_DEPENDENCIES = [
    *SUBMIT_DEPENDENCIES,
    inspect.Parameter("response", inspect.Parameter.KEYWORD_ONLY, annotation=Response),
]


def _sync_endpoint(kind: JobKind):
    async def run(*, request: Request, dispatcher: DispatcherDep, principal: PrincipalDep, base: BaseUrlDep,
                  idempotency_key: IdempotencyKeyDep, response: Response, **values: Any) -> dict[str, Any]:
        uploads, _, form = split(kind, values)
        submission = await dispatcher.read(kind, uploads, form, principal)
        # its own route in the fingerprint ("diarize", not "jobs/diarize"): one key is one request
        idempotent = Idempotent(idempotency_key, kind.sync_path.strip("/"), sent_fields(await request.form())) \
            if idempotency_key and kind.sync_path else None
        record = await dispatcher.run_sync(submission, principal, request, idempotent=idempotent)
        if getattr(request.state, "idempotent_replayed", False):
            response.headers["Idempotent-Replayed"] = "true"
        return record.result or {}

    run.__name__ = kind.name
    # the original contract: uploads only (audio by URL is for jobs, whose worker fetches it)
    return with_signature(run, SYNC_DEPENDENCIES, _fields(kind, urls=False))


for _kind in KINDS.values():
    jobs.add_api_route(
        f"/{_kind.name}", _submit_endpoint(_kind), methods=["POST"], status_code=202, response_model=Job,
        responses=ACCEPTED, summary=f"Submit: {_kind.summary.lower()}", name=f"submit_{_kind.name}",
    )
    if _kind.sync_path:
        synchronous.add_api_route(
            _kind.sync_path, _sync_endpoint(_kind), methods=["POST"], response_model=_kind.result,
            summary=_kind.summary, name=_kind.name, responses=SYNC_REPLAYED,
        )
