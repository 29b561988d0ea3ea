"""``audio-analysis`` command line: the engine offline, and the service (up, submit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Speaker diarization and verification.")
err = Console(stderr=True)


def _engine():
    from engine.core import Engine

    return Engine()


def _fail(exc: Exception) -> None:
    from shared.errors import AnalysisError

    if isinstance(exc, AnalysisError):
        err.print(f"[red]{exc.error_type}[/red]: {exc.detail}")
        raise typer.Exit(2 if exc.status_code < 500 else 1)
    raise exc


@app.command()
def diarize(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="audio file"),
    num_speakers: Optional[int] = typer.Option(None, "--num-speakers", help="exact number of speakers"),
    min_speakers: Optional[int] = typer.Option(None, "--min-speakers"),
    max_speakers: Optional[int] = typer.Option(None, "--max-speakers"),
    min_duration: float = typer.Option(0.0, "--min-duration", help="drop turns shorter than this (s)"),
    rttm: Optional[Path] = typer.Option(None, "--rttm", help="also write the result as RTTM here ('-' = stdout only RTTM)"),
) -> None:
    """Who spoke when. Prints JSON (the /diarize body), or RTTM with --rttm."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    engine = _engine()
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), console=err, transient=True,
        ) as bar:
            task = bar.add_task("loading", total=1.0)
            result = engine.diarize(
                file,
                num_speakers=num_speakers,
                min_speakers=min_speakers,
                max_speakers=max_speakers,
                min_duration=min_duration,
                progress=lambda step, frac: bar.update(task, completed=frac, description=step),
            )
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    if rttm is not None:
        from shared.rttm import to_rttm

        text = to_rttm(result.diarization_results, uri=file.stem)
        if str(rttm) == "-":
            typer.echo(text, nl=False)
            return
        rttm.write_text(text)
    typer.echo(result.model_dump_json(indent=2))


@app.command()
def embed(
    file: Path = typer.Argument(..., exists=True, dir_okay=False),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise the vector"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also save the vector as .npy or .json"),
) -> None:
    """192-dim speaker embedding as JSON (the /embedding body)."""
    import numpy as np

    try:
        result = _engine().embed(file, normalize=normalize)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    if output is not None:
        if output.suffix == ".npy":
            np.save(output, np.asarray(result.embedding, dtype=np.float32))
        else:
            output.write_text(json.dumps(result.embedding))
    typer.echo(result.model_dump_json(indent=2))


@app.command()
def compare(
    first: Path = typer.Argument(..., exists=True, dir_okay=False),
    second: Path = typer.Argument(..., exists=True, dir_okay=False),
    threshold: Optional[float] = typer.Option(None, help="cosine threshold (default: calibrated setting)"),
) -> None:
    """Are two recordings the same speaker? JSON (the /compare body)."""
    try:
        result = _engine().compare(first, second, threshold=threshold)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    typer.echo(result.model_dump_json(indent=2))


def _register_service_commands() -> None:
    # up / worker / submit live with the service code
    from cli import service as service_cli

    service_cli.register(app)


_register_service_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
