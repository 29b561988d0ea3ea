"""Service commands of the CLI: ``up`` (local stack without Docker) and ``submit`` (job client)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from cli.options import option_parameters, set_signature
from shared.kinds import KINDS, get_kind

err = Console(stderr=True)


def up(
    port: Optional[int] = typer.Option(None, help="API port (default: settings.api_port)"),
    flower: bool = typer.Option(True, "--flower/--no-flower", help="also start Flower"),
) -> None:
    """Start Redis (if REDIS_URL is unreachable), the API, one worker and Flower; Ctrl-C stops all."""
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
    url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="AUDIO_ANALYSIS_URL", help="API base URL"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AUDIO_ANALYSIS_API_KEY"),
    wait: bool = typer.Option(False, "--wait", help="wait for the result with a progress bar"),
    webhook_url: Optional[str] = typer.Option(None, "--webhook-url"),
    **values: Any,
) -> None:
    """Submit a job to a running service; prints the job, or its result with --wait.

    Audio may be an http(s) URL instead of a file (a presigned S3/GCS URL, say): the service's
    worker fetches it.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.client import Client, is_url
    from shared.errors import AnalysisError

    job_kind = get_kind(kind)
    # only the chosen kind's options go out; the API validates them with the kind's model
    params = {name: values.get(name) for name in job_kind.form_fields}
    for source in files:
        if not is_url(source) and not Path(source).is_file():
            err.print(f"[red]{source}[/red]: no such file (give a local file or an http(s) URL)")
            raise typer.Exit(2)
    try:
        with Client(url, api_key=api_key) as client:
            job = client.submit(kind, *(f if is_url(f) else Path(f) for f in files), webhook_url=webhook_url,
                                **params)
            if not wait:
                typer.echo(json.dumps(job, indent=2))
                return
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TimeElapsedColumn(), console=err, transient=True) as bar:
                task = bar.add_task("queued", total=1.0)
                record = client.wait(
                    job["job_id"], progress=lambda frac, step: bar.update(task, completed=frac, description=step or "")
                )
            if record["status"] != "succeeded":
                err.print(f"[red]job {record['job_id']} {record['status']}[/red]: {json.dumps(record.get('error'))}")
                raise typer.Exit(2 if (record.get("error") or {}).get("status_code", 500) < 500 else 1)
            typer.echo(json.dumps(record["result"], indent=2))
    except AnalysisError as exc:
        err.print(f"[red]{exc.error_type}[/red] ({exc.status_code}): {exc.detail}")
        raise typer.Exit(2 if exc.status_code < 500 else 1)


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
