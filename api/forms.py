"""A job kind's multipart form, as FastAPI parameters built from its declaration.

FastAPI reads an endpoint's parameters from ``inspect.signature``; :func:`kind_endpoint` gives
a generic endpoint the signature of one kind (its upload fields as ``File``, its parameter
model's form fields as ``Form``), so every kind's routes document and parse exactly their own
fields, and nothing is written per kind. The values then go through the kind's pydantic model
once (``Dispatcher.read``).
"""

from __future__ import annotations

import codecs
import inspect
from types import UnionType
from typing import Any, Awaitable, Callable, Iterable, Literal, Union, get_args, get_origin

from fastapi import File, Form, Request, UploadFile
from pydantic.fields import FieldInfo
from python_multipart.multipart import parse_options_header

from shared.errors import InputError
from shared.kinds import KINDS, JobKind, loose_number, number_type

def optional_form(description: str) -> Any:
    """An optional form field, documented with an empty example.

    /docs (Swagger UI) fills every form field of "Try it out" with a sample of its type and sends
    it: ``file_url=string``, ``num_speakers=0``, ``webhook_url=string``..., so a submission made
    there with nothing but a file was refused 422 ("give either an upload or file_url, not
    both"). An empty example leaves the field empty, and an empty field is not sent (or, sent
    empty, is read as left out), so the request is what the user filled in."""
    return Form(None, description=description, examples=[""])


def _files_as_files(schema: dict[str, Any]) -> None:
    # OpenAPI 3.1 gives an upload as a string with contentMediaType, which Swagger UI shows as
    # a file input for one upload but not for the items of an array of them
    items = schema.get("items")
    if isinstance(items, dict) and "contentMediaType" in items:
        items["format"] = "binary"


def several_files(description: str) -> Any:
    """A required field of one or more uploads (``files``: repeat the field once per file).

    Documented with its items as ``format: binary``: /docs (Swagger UI) offered text boxes
    prefilled with random characters for them, so /jobs/batch, /jobs/enroll and /voiceprints
    could not be tried there at all (422, "files.0: Value error, Expected UploadFile, received:
    <class 'str'>"); it now offers a file input per item."""
    return File(..., description=description, json_schema_extra=_files_as_files)


WEBHOOK = inspect.Parameter(
    "webhook_url", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
    default=optional_form("POSTed the job record, signed, when the job ends"),
)
WEBHOOK_PAYLOAD = inspect.Parameter(
    "webhook_payload", inspect.Parameter.KEYWORD_ONLY, annotation=Literal["full", "status"] | None,
    default=optional_form("what the webhook carries: 'full' (default) the job record with its result, "
                          "'status' the record without `result` (fetch it from GET /jobs/{id}/result)"),
)
# every asynchronous route's webhook fields, after the kind's own
WEBHOOK_FIELDS = [WEBHOOK, WEBHOOK_PAYLOAD]


def file_parameters(kind: JobKind, *, urls: bool = False) -> list[inspect.Parameter]:
    """The kind's uploads (a multiple-file field's a list); with ``urls``, each single audio
    upload optional and ``<name>_url`` beside it (exactly one of the two is required, checked by
    ``Dispatcher.read``). A multiple-file field has no URL alternative."""
    params = []
    for f in kind.files:
        if urls and f.url_name:
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile | None,
                default=File(None, description=f"{f.description}; or give {f.url_name} instead"),
            ))
            params.append(inspect.Parameter(
                f.url_name, inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                default=optional_form(
                    f"instead of uploading {f.name}: an http(s) URL the worker fetches it from (a presigned "
                    "S3/GCS URL, say); public addresses only, same size and duration limits as an upload"
                ),
            ))
        else:
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=list[UploadFile] if f.multiple else UploadFile,
                default=several_files(f"{f.description} (1 to {f.max_count})") if f.multiple
                else File(..., description=f.description),
            ))
    return params


def form_parameters(fields: Iterable[tuple[str, FieldInfo]], *, required: bool = False) -> list[inspect.Parameter]:
    """Each parameter arrives as an optional form field; defaults are the model's to apply.
    With ``required`` (one kind's route), a field the kind cannot run without (enroll's
    ``label``, identify's ``voiceprints``) is a required one, as the OpenAPI document then says:
    it showed them optional, and a request made as /docs described was refused 422."""
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation | None,
                          default=Form(..., description=field.description) if required and field.is_required()
                          else optional_form(field.description))
        for name, field in fields
    ]


async def refuse_repeated(request: Request, names: Iterable[str]) -> None:
    """422 for a field that takes one value but was sent more than once.

    Starlette keeps every value and FastAPI reads the last: ``num_speakers=2&num_speakers=7``
    ran with 7, and of two ``file`` uploads the first was dropped without a word. A request
    that says two things at once is refused rather than guessed at.
    """
    form = await request.form()  # parsed once already, for the endpoint's parameters: cached
    for name in names:
        count = len(form.getlist(name))
        if count > 1:
            raise InputError(f"{name}: given {count} times; send each field once")


def _takes_several(annotation: Any) -> bool:
    """True for a list (set, tuple) annotation, also inside ``X | None``."""
    if get_origin(annotation) in (list, set, tuple, frozenset):
        return True
    return any(_takes_several(arg) for arg in get_args(annotation) if arg is not type(None)) \
        if get_origin(annotation) in (Union, UnionType) else False


async def refuse_repeated_query(request: Request) -> None:
    """422 for a query parameter of the route that takes one value but came more than once.

    As for form fields (:func:`refuse_repeated`): ``GET /jobs?status=failed&status=succeeded``
    was read as its last value and answered as if only ``status=succeeded`` had been asked.
    So is one of the route's parameters misspelt by its case or a dash (:func:`refuse_misspelt`).
    Installed on the whole app; other parameters the route does not declare are left alone.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    pending, fields = [dependant], []
    while pending:  # the route's own query parameters and its dependencies'
        current = pending.pop()
        fields += current.query_params
        pending += current.dependencies
    for field in fields:
        if _takes_several(field.field_info.annotation):
            continue
        count = len(request.query_params.getlist(field.alias))
        if count > 1:
            raise InputError(f"{field.alias}: given {count} times; send each query parameter once")
    # GET /jobs?Status=failed listed every job, as if every one had failed, and ?Limit=5 twenty
    refuse_misspelt(request.query_params.keys(), [f.alias for f in fields], "query parameter", job_fields=False)


async def refuse_loose_numbers(request: Request) -> None:
    """422 for a number parameter of the route (query or form) not written as plain digits.

    FastAPI reads them with pydantic's lax mode, which takes what Python's ``int()`` and
    ``float()`` take: ``num_speakers=1_0`` ran with 10 speakers, ``limit=+5`` or ``limit=%205``
    listed 5, ``threshold=+0.5`` compared at 0.5 (:func:`shared.kinds.loose_number`). Checked on
    the raw text of every route's own number parameters, once, before any of them is read; the
    form is read only for a route that takes a number in it (parsed once, and cached for the
    route). Installed on the whole app, with :func:`refuse_repeated_query`.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    queried, posted, pending = [], [], [dependant]
    while pending:  # the route's own parameters and its dependencies'
        current = pending.pop()
        queried += current.query_params
        posted += current.body_params
        pending += current.dependencies
    sources = [(request.query_params, queried)] if request.query_params else []
    posted = [f for f in posted if number_type(f.field_info.annotation) is not None]
    if posted and request.headers.get("content-type", "").split(";", 1)[0].strip().lower() in FORM_TYPES:
        sources.append((await request.form(), posted))
    for values, fields in sources:
        for f in fields:
            kind = number_type(f.field_info.annotation)
            if kind is None:
                continue
            for text in values.getlist(f.alias):
                if isinstance(text, str) and (problem := loose_number(f.alias, text, kind)):
                    raise InputError(problem)


def _known_fields() -> frozenset[str]:
    """Every form field some job route reads: each kind's uploads, their ``<name>_url``, its
    parameters and lookups, the webhook's fields, and the batch's ``kind``."""
    names = {"kind", *(p.name for p in WEBHOOK_FIELDS)}
    for kind in KINDS.values():
        names |= {f.name for f in kind.files} | set(kind.url_fields) | set(kind.form_fields)
    return frozenset(names)


KNOWN_FIELDS = _known_fields()


async def refuse_foreign(request: Request, accepted: Iterable[str]) -> None:
    """422 for a field this route does not read that another route does.

    Such a field was dropped without a word: ``POST /identify`` with diarization's
    ``identification_threshold=0.9`` named speakers at the default threshold (the batch route
    refused it already; the kinds' own routes did not), ``/jobs/embedding`` ran with
    diarization's ``num_speakers`` ignored, and ``POST /diarize`` (synchronous) with a
    ``webhook_url`` never sent it. Names no route reads are left alone, as query parameters are.
    """
    form = await request.form()  # parsed once already, for the endpoint's parameters: cached
    accepted = set(accepted)
    foreign = sorted({name for name in form.keys() if name in KNOWN_FIELDS and name not in accepted})
    if foreign:
        raise InputError(f"{', '.join(foreign)}: not a field of {request.method} {request.url.path}, which takes "
                         f"{', '.join(sorted(accepted))}")
    refuse_misspelt(form.keys(), accepted, "field")


def _spelling(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def refuse_misspelt(sent: Iterable[str], accepted: Iterable[str], what: str, *, job_fields: bool = True) -> None:
    """422 for a name that is a field of a job route but for its case, a dash or spaces around it.

    Names are case-sensitive, and one no route reads is left alone: ``Num_Speakers=3`` (a form
    filled from a template, a client that capitalises its keys) and ``num-speakers=3`` ran with
    the default speaker count, and a second upload sent as ``FILE`` was dropped, 202 without a
    word. Such a name is no proxy's or tracker's: it is this API's field, misspelt. With
    ``job_fields`` (a form), the job routes' fields count as this route's too (another route's
    field is :func:`refuse_foreign`'s); a query string is held to the route's own parameters."""
    accepted = list(accepted)
    known = KNOWN_FIELDS if job_fields else frozenset()
    ours = {_spelling(name): name for name in (*known, *accepted)}
    taken = set(accepted) | known
    misspelt = sorted({name for name in sent if name not in taken and _spelling(name) in ours})
    if misspelt:
        # a name is quoted at most 60 characters long: spaces around it may run to the part's size
        said = ", ".join(f"{name[:60]!r} (the {what} is {ours[_spelling(name)]})" for name in misspelt[:5])
        raise InputError(f"{said}: {what} names are case-sensitive, with '_' between words; send each as named")


def refuse_fields_in_query(request: Request, form_fields: frozenset[str]) -> None:
    """422 for a form field of this route, or of another job route, sent in the query string of
    a route that takes a form.

    Such a field was dropped without a word, as a field of another route was
    (:func:`refuse_foreign`): ``POST /jobs/diarize?num_speakers=3&webhook_url=...`` (``curl -F``
    for the file, the rest in the URL) queued a job that ran with the default speaker count and
    sent no webhook, and ``POST /voiceprints/import?label=Bob`` stored the file's label. Checked
    before the body is read; names no route reads are left alone, as in the form.
    """
    sent = sorted({name for name in request.query_params.keys() if name in form_fields or name in KNOWN_FIELDS
                   or _spelling(name) in {_spelling(f) for f in (*form_fields, *KNOWN_FIELDS)}})
    if sent:
        raise InputError(f"{', '.join(sent)}: sent in the query string; {request.method} {request.url.path} "
                         "takes its fields in the form (multipart/form-data), not the URL")


FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


def refuse_other_bodies(request: Request) -> None:
    """415 for a body that is not a form, sent to a route that takes one, naming what was sent
    and what is taken.

    A JSON body (``{"file_url": "https://…", "num_speakers": 2}``, what most HTTP APIs take) was
    read as an empty form and answered "file: an upload (or file_url) is required" though it
    held a file_url; audio sent as the body itself (``--data-binary @meeting.wav``) likewise.
    A request without a Content-Type is left to the form's own checks."""
    sent = request.headers.get("content-type")
    if sent is None:
        return
    given = len(request.headers.getlist("content-type"))
    if given > 1:
        # Starlette reads the first; a proxy or filter in front may go by the last (a JSON body
        # it let through, parsed here as a form): one request, two readings of its body
        raise AmbiguousBody(f"Content-Type given {given} times; send one")
    media = sent.split(";", 1)[0].strip().lower()
    if media and media not in FORM_TYPES:
        raise UnsupportedBody(
            f"{request.method} {request.url.path} takes a form (multipart/form-data; without a file also "
            f"application/x-www-form-urlencoded), not {media[:100]}: with curl, -F 'file=@meeting.wav' for an "
            "upload and -F name=value for each other field")
    if media in FORM_TYPES:
        refuse_unreadable_charset(sent)


# what every form's names and separators are written in: a charset that writes them otherwise
# (UTF-16, UTF-32, EBCDIC) is not one a form can be read in
_ASCII_PROBE = 'Content-Disposition: form-data; name="file_url"; filename="a.wav"\r\n--&=+%'


def ascii_compatible(charset: str, probe: str = _ASCII_PROBE) -> str | None:
    """``charset``'s codec name where it writes ``probe`` (ASCII) as ASCII; None for one that
    does not (UTF-16, UTF-32, EBCDIC) or that Python does not know as a text encoding ("hex",
    "zlib", "rot13")."""
    try:
        return codecs.lookup(charset).name if codecs.encode(probe, charset) == probe.encode("ascii") else None
    except (LookupError, TypeError, ValueError):
        return None


def refuse_unreadable_charset(content_type: str) -> None:
    """415 for a form whose Content-Type names a charset that does not write ASCII as ASCII
    (``charset=utf-16``, ``utf-32``, ``cp037``), or one Python does not know as a text encoding.

    Starlette decoded each part's name in that charset: in UTF-16, ``name="file"`` became two
    CJK characters, so the upload was no field of the route and the client was told
    "file: an upload (or file_url) is required"; in UTF-32 (whose decoding of it fails, so it
    falls back to Latin-1) the same form was taken. A charset the form's ASCII survives
    (UTF-8, Latin-1, Windows-1252) is read as before."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset")
    if charset is None:
        return
    name = charset.decode("latin-1").strip()
    if ascii_compatible(name) is None:
        raise UnsupportedBody(
            f"Content-Type charset {name[:40]!r} is not supported for a form: send it in UTF-8 "
            "(charset=utf-8, or no charset)")


class UnsupportedBody(InputError):
    status_code = 415


class AmbiguousBody(InputError):
    status_code = 400


def with_signature(endpoint: Callable[..., Awaitable[Any]], fixed: list[inspect.Parameter],
                   extra: list[inspect.Parameter]) -> Callable[..., Awaitable[Any]]:
    """``endpoint(**values)`` as FastAPI sees it: ``fixed`` (dependencies, ``request`` among
    them) then ``extra``; a field of ``extra`` that takes one value (anything but a list of
    files) sent more than once is refused first (:func:`refuse_repeated`), and so is a field
    another route reads but not this one (:func:`refuse_foreign`)."""
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed] + extra
    single = tuple(p.name for p in extra if get_origin(p.annotation) is not list)
    accepted = tuple(p.name for p in extra)

    async def checked(**values: Any) -> Any:
        await refuse_repeated(values["request"], single)
        await refuse_foreign(values["request"], accepted)
        return await endpoint(**values)

    checked.__name__, checked.__qualname__, checked.__doc__ = endpoint.__name__, endpoint.__qualname__, endpoint.__doc__
    checked.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    checked.__annotations__ = {p.name: p.annotation for p in params}
    return checked


def split(kind: JobKind, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(uploads, URLs by audio field, form fields of the kind's parameters) out of an endpoint's
    keyword values; a field left out (or sent empty) is not among them; a multiple-file field's
    upload is a list."""
    uploads = {f.name: values[f.name] for f in kind.files if values.get(f.name) is not None}
    urls = {spec.name: values[name] for name, spec in kind.url_fields.items() if values.get(name)}
    form = {name: values.get(name) for name in kind.form_fields}
    return uploads, urls, form
