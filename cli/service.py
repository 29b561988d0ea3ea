"""Service commands of the CLI: ``up`` (local stack without Docker), and the job client:
``submit`` (optionally ``--wait`` for the result, in any ``--format`` its kind offers), ``status``,
``result`` and ``cancel`` of a job id."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cli.options import check_output, choices, option_parameters, plain, set_signature, usage_error
from shared.formats import FORMAT_NAMES, one_line
from shared.kinds import KINDS, get_kind

err = Console(stderr=True)

_FORMATS = "json (every kind) | rttm | srt | vtt (diarization)"


def _url_option() -> Any:
    return typer.Option("http://127.0.0.1:8000", "--url", envvar="AUDIO_ANALYSIS_URL", help="API base URL")


def _api_key_option() -> Any:
    return typer.Option(None, "--api-key", envvar="AUDIO_ANALYSIS_API_KEY")


Format = choices("Format", FORMAT_NAMES)
WebhookPayload = choices("WebhookPayload", ["full", "status"])


def _format_option(default: str | None) -> Any:
    return typer.Option(default, "--format", "-f", help=_FORMATS)


def shown(text: object) -> str:
    """Text the API (or whatever answers at --url) sent, as rich prints it literally: its
    brackets are not markup (a detail with "[/]" crashed the CLI with a MarkupError, "[link=...]"
    made a link) and its control characters (a terminal's ESC sequences) are spaces."""
    return escape(one_line(str(text)))


def _exit_for(exc: Exception, url: str | None = None) -> typer.Exit:
    """An API or job error, printed; exit 2 for the caller's mistakes (4xx), 1 for the service's.
    An API that cannot be reached is named, with how to name another: "cannot reach the API
    (ConnectError): [Errno 111] Connection refused" said neither where it looked nor that an API
    on another port (`up --port`, AUDIO_ANALYSIS_API_PORT) needs --url."""
    import httpx

    from shared.errors import AnalysisError

    if isinstance(exc, httpx.TransportError):
        where = f" at {shown(url)}" if url else ""
        err.print(f"[red]cannot reach the API{where}[/red] ({type(exc).__name__}): {shown(exc)}"
                  + ("; is the service running there? Another address: --url or AUDIO_ANALYSIS_URL" if url else ""))
        return typer.Exit(1)
    if not isinstance(exc, AnalysisError):
        raise exc
    err.print(f"[red]{shown(exc.error_type)}[/red] ({exc.status_code}): {shown(exc.detail)}")
    return typer.Exit(2 if exc.status_code < 500 else 1)


def _retrying_said(url: str) -> Any:
    """What the client's retries tell stderr: an API that does not answer (or answers 502, 503,
    504, 429) was waited for in silence, 15 s and four retries before "cannot reach the API"."""
    def said(why: str, wait_s: float, retry: int, retries: int) -> None:
        err.print(f"[yellow]the API at {shown(url)}[/yellow]: {shown(why)}; retry {retry} of {retries} in "
                  f"{wait_s:.0f} s", highlight=False, soft_wrap=True)

    return said


def _echo_result(result: Any, format: str) -> None:  # noqa: A002
    if format == "json":
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(result, nl=False)


def up(
    port: Optional[int] = typer.Option(
        None, help="API port (default 8000, or AUDIO_ANALYSIS_API_PORT; Flower's: AUDIO_ANALYSIS_FLOWER_PORT, 5555)"),
    flower: bool = typer.Option(True, "--flower/--no-flower", help="also start Flower"),
) -> None:
    """Start Redis (if REDIS_URL is unreachable), the API, a job worker, a webhook-delivery worker and
    Flower; Ctrl-C stops all."""
    from cli.launcher import run_local
    from shared.settings import get_settings

    settings = get_settings()
    if port is not None:
        settings = settings.model_copy(update={"api_port": port})
    raise typer.Exit(run_local(settings, with_flower=flower, console=err))


def submit(
    files: List[str] = typer.Argument(
        ..., metavar="FILE_OR_URL...",
        help="the kind's input(s), in order: a local file, or for audio an http(s) URL the service fetches",
    ),
    kind: str = typer.Option("diarize", "--kind", "-k", help=" | ".join(KINDS)),
    url: str = _url_option(),
    api_key: Optional[str] = _api_key_option(),
    wait: bool = typer.Option(False, "--wait", help="wait for the result with a progress bar"),
    format: Optional[Format] = _format_option(None),  # noqa: A002
    webhook_url: Optional[str] = typer.Option(None, "--webhook-url"),
    webhook_payload: Optional[WebhookPayload] = typer.Option(
        None, "--webhook-payload", help="full (default): the webhook carries the result; status: the record without it"),
    **values: Any,
) -> None:
    """Submit a job to a running service; prints the job, or with --wait its result (--format).

    Audio may be an http(s) URL instead of a file (a presigned S3/GCS URL, say): the service's
    worker fetches it.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    import httpx

    from cli.client import Client, check_sources, is_url
    from shared.errors import AnalysisError

    try:
        job_kind = get_kind(kind)
    except AnalysisError as exc:
        usage_error(f"--kind {kind}", exc.detail)
    format, webhook_payload = plain(format), plain(webhook_payload)
    if format is not None and not wait:
        err.print("[red]--format[/red] is the format of the result: it needs --wait (or use `result JOB_ID --format`)")
        raise typer.Exit(2)
    try:
        # before anything is uploaded: a format the kind does not offer would waste the job
        format = job_kind.check_format(format or "json")
    except (AnalysisError, httpx.TransportError) as exc:
        raise _exit_for(exc)
    # only the chosen kind's options go out; the API validates them with the kind's model
    params = {name: values.get(name) for name in job_kind.form_fields}
    try:
        # how many files the kind takes, and which may be URLs: before anything is uploaded
        check_sources(kind, tuple(files))
    except ValueError as exc:
        usage_error("submit", str(exc))
    for source in files:
        if is_url(source):
            continue
        if Path(source).is_dir():
            usage_error(source, "is a directory (give a file or an http(s) URL)")
        if not Path(source).is_file():
            usage_error(source, "no such file (give a local file or an http(s) URL)")
    # an option the kind cannot run without, before anything is uploaded: it was the API's
    # "ValidationError (422): label: Field required", once the files had gone up
    missing = [name for name, spec in job_kind.form_fields.items() if spec.is_required() and not params.get(name)]
    if missing:
        usage_error(f"submit --kind {kind}", "needs " + ", ".join("--" + n.replace("_", "-") for n in missing))
    try:
        with Client(url, api_key=api_key, on_retry=_retrying_said(url)) as client:
            job = client.submit(kind, *(f if is_url(f) else Path(f) for f in files), webhook_url=webhook_url,
                                webhook_payload=webhook_payload, **params)
            if not wait:
                typer.echo(json.dumps(job, indent=2))
                return
            # the job's id, said before the wait: with --wait it was printed nowhere, so a Ctrl-C,
            # a closed terminal or an API gone for longer than the retries left a job running
            # (and billed) that its submitter could neither follow, fetch nor cancel
            job_id = shown(job["job_id"])
            err.print(f"job {job_id} queued; waiting for it (Ctrl-C stops the wait, not the job)",
                      highlight=False, soft_wrap=True)
            try:
                with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                              TimeElapsedColumn(), console=err, transient=True) as bar:
                    task = bar.add_task("queued", total=1.0)
                    record = client.wait(
                        job["job_id"],
                        progress=lambda frac, step: bar.update(task, completed=frac, description=shown(step or "")),
                    )
            except (KeyboardInterrupt, httpx.TransportError) as exc:
                err.print(f"stopped waiting; job {job_id} goes on: `audio-analysis status {job_id}` follows it, "
                          f"`audio-analysis result {job_id}` fetches its result, `audio-analysis cancel {job_id}` "
                          "stops it", highlight=False, soft_wrap=True)
                if isinstance(exc, KeyboardInterrupt):
                    raise typer.Exit(130) from None
                raise
            if record["status"] != "succeeded":
                err.print(f"[red]job {shown(record['job_id'])} {shown(record['status'])}[/red]: "
                          f"{shown(json.dumps(record.get('error')))}")
                raise typer.Exit(2 if (record.get("error") or {}).get("status_code", 500) < 500 else 1)
            _echo_result(record["result"] if format == "json" else client.result(job["job_id"], format), format)
    except (AnalysisError, httpx.TransportError) as exc:
        raise _exit_for(exc, url)


def status(
    job_id: str = typer.Argument(..., help="the job id submit printed"),
    url: str = _url_option(),
    api_key: Optional[str] = _api_key_option(),
) -> None:
    """Print a job's record: status, progress, result or error, webhook state."""
    typer.echo(json.dumps(_with_client(url, api_key, lambda client: client.status(job_id)), indent=2))


def result(
    job_id: str = typer.Argument(..., help="the job id submit printed"),
    format: Format = _format_option("json"),  # noqa: A002
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write it to this file instead of stdout"),
    url: str = _url_option(),
    api_key: Optional[str] = _api_key_option(),
) -> None:
    """Print a succeeded job's result, in a format its kind offers.

    Exit 2 while it has none (queued, running, cancelled), or with the job's error if it failed.
    """
    format = plain(format)
    check_output(output, "--output")
    body = _with_client(url, api_key, lambda client: client.result(job_id, format))
    if output is not None:
        try:
            output.write_text(json.dumps(body, indent=2) + "\n" if format == "json" else body)
        except OSError as exc:  # permission denied, disk full: the result is still there to fetch
            usage_error(f"--output {output}", exc.strerror or type(exc).__name__)
        return
    _echo_result(body, format)


def cancel(
    job_id: str = typer.Argument(..., help="the job id submit printed"),
    url: str = _url_option(),
    api_key: Optional[str] = _api_key_option(),
) -> None:
    """Cancel a queued or running job; prints its record (exit 2 if it already ended)."""
    typer.echo(json.dumps(_with_client(url, api_key, lambda client: client.cancel(job_id)), indent=2))


def _with_client(url: str, api_key: str | None, call: Any) -> Any:
    """``call(client)`` against the API; a refusal or an unreachable API is the CLI's exit code."""
    import httpx

    from cli.client import Client
    from shared.errors import AnalysisError

    try:
        with Client(url, api_key=api_key, on_retry=_retrying_said(url)) as client:
            return call(client)
    except (AnalysisError, httpx.TransportError) as exc:
        raise _exit_for(exc, url)


def _all_form_fields() -> dict[str, Any]:
    # every kind's options, each named once (the kind picked decides which are sent)
    fields: dict[str, Any] = {}
    for job_kind in KINDS.values():
        for name, field in job_kind.form_fields.items():
            fields.setdefault(name, field)
    return fields


def _submit_command():
    def command(**values: Any) -> None:
        submit(**values)

    command.__doc__ = submit.__doc__
    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(submit).parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return set_signature(command, fixed + option_parameters(_all_form_fields()))


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``audio-analysis`` app."""
    app.command()(up)
    app.command(name="submit")(_submit_command())
    for command in (status, result, cancel):
        app.command()(command)
