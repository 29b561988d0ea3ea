"""Service commands of the CLI: ``up`` (local stack without Docker) and ``submit`` (job client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

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
    files: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="audio file(s); compare takes two"),
    kind: str = typer.Option("diarize", "--kind", "-k", help="diarize | embedding | compare | compare_embedding"),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="AUDIO_ANALYSIS_URL", help="API base URL"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AUDIO_ANALYSIS_API_KEY"),
    wait: bool = typer.Option(False, "--wait", help="wait for the result with a progress bar"),
    num_speakers: Optional[int] = typer.Option(None, "--num-speakers"),
    min_speakers: Optional[int] = typer.Option(None, "--min-speakers"),
    max_speakers: Optional[int] = typer.Option(None, "--max-speakers"),
    threshold: Optional[float] = typer.Option(None, "--threshold"),
    webhook_url: Optional[str] = typer.Option(None, "--webhook-url"),
) -> None:
    """Submit a job to a running service; prints the job, or its result with --wait."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.client import Client
    from shared.errors import AnalysisError

    params = {"num_speakers": num_speakers, "min_speakers": min_speakers, "max_speakers": max_speakers} \
        if kind == "diarize" else {"threshold": threshold} if kind.startswith("compare") else {}
    try:
        with Client(url, api_key=api_key) as client:
            job = client.submit(kind, *files, webhook_url=webhook_url, **params)
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


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``audio-analysis`` app."""
    app.command()(up)
    app.command()(submit)
