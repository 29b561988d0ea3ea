"""``audio-analysis`` command line: every job kind offline on the engine, and the service (up,
submit, status, result, cancel).

The offline commands are derived from shared/kinds.py: a kind's uploads are the command's
arguments and its parameters its options, validated by the same model the API uses, and the
engine call is the kind's own, and ``--format`` offers the formats the kind declares (the
API's ``GET /jobs/{id}/result?format=``). What a kind writes besides (an RTTM file, a .npy file)
is the only per-kind code here.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from cli.options import check_output, choices, option_parameters, plain, set_signature, usage_error
from shared.errors import AnalysisError
from shared.kinds import KINDS, JobKind, Params
from shared.settings import Settings, get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Speaker diarization and verification.")
err = Console(stderr=True)

# the command name of a kind, where the CLI had a shorter one first
COMMAND_NAMES = {"embedding": "embed"}


def _fail(exc: Exception) -> None:
    if isinstance(exc, AnalysisError):
        from cli.service import shown

        # the detail names files ("x[/]y.wav"): printed literally, not as markup; one line
        # however long (soft_wrap), as a script reading stderr expects, not cut at 80 columns
        err.print(f"[red]{shown(exc.error_type)}[/red]: {shown(exc.detail)}", soft_wrap=True)
        raise typer.Exit(2 if exc.status_code < 500 else 1)
    raise exc


def read_inputs(kind: JobKind, files: dict[str, Any], options: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """As the API does: non-audio files parsed into parameters, lookups resolved (offline:
    voiceprint files), all validated once. A multiple-file field's value is a list of paths."""
    values = dict(options)
    settings = get_settings()
    for lookup in kind.lookups:
        given = values.pop(lookup.name, None)
        if given:
            values[lookup.into] = lookup.resolve_offline(str(given), settings)
    for spec in kind.files:
        if spec.parse is not None:
            values[spec.into or spec.name] = spec.parse(files[spec.name].read_bytes(), files[spec.name].name,
                                                        get_settings())
    # with settings, the rules of a request read at the edge, as the API applies them
    # (identification_threshold without voiceprints, min_duration past the longest audio)
    return kind.parse_params(values, settings), {f.name: files[f.name] for f in kind.audio_files}


# A frozen CAM++ (shared.settings.Settings.embedding_frozen) saves about 4 ms of CPU per second
# of speech embedded and costs 1.5-2.7 s to build: it pays from about 5 minutes of audio (a
# diarization embeds each second about 1.5 times). Below that a one-off command runs it eagerly:
# `compare` of two utterances took 10.2 s, 2.7 s of it the trace.
FROZEN_FROM_S = 300.0


def engine_settings(audio: dict[str, Any]) -> Settings:
    """The settings an offline command's engine runs with: the service's, with CAM++ left
    unfrozen for short recordings (header durations; a file without one counts as long). A file
    that is not audio is refused here (NotAudioError), before the engine is imported, as the API
    refuses it at submit: the engine's decoder said so only after torch and the models had
    loaded (7-9 s)."""
    from shared.audio_limits import audio_header

    settings = get_settings()
    # every file's header, each refusing what is not audio
    infos = [audio_header(path) for value in audio.values() for path in (value if isinstance(value, list) else [value])]
    if any(info is None or info.duration is None for info in infos) or sum(i.duration for i in infos) >= FROZEN_FROM_S:
        return settings
    return settings.model_copy(update={"embedding_frozen": False})


# --- what some kinds write besides JSON ----------------------------------------------------------
def _rttm_option() -> inspect.Parameter:
    return inspect.Parameter("rttm", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--rttm", help="also write the result as RTTM here ('-' = stdout only RTTM, as --format rttm)"))


def _write_rttm(result: Any, files: dict[str, Path], rttm: Path | None) -> bool:
    if rttm is None:
        return False
    from shared.formats import to_rttm

    text = to_rttm(result.model_dump(mode="json"), uri=files["file"].stem)
    if str(rttm) == "-":
        typer.echo(text, nl=False)
        return True
    rttm.write_text(text)
    return False


def _output_option() -> inspect.Parameter:
    return inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--output", "-o", help="also save the vector as .npy or .json"))


def _write_vector(result: Any, files: dict[str, Path], output: Path | None) -> bool:
    if output is not None:
        if output.suffix == ".npy":
            import numpy as np

            np.save(output, np.asarray(result.embedding, dtype=np.float32))
        else:
            output.write_text(json.dumps(result.embedding))
    return False


# kind -> (extra option, writer returning True when it printed the output itself)
EXTRA_OUTPUT = {"diarize": (_rttm_option, _write_rttm), "embedding": (_output_option, _write_vector)}


def _format_option(kind: JobKind) -> inspect.Parameter:
    return inspect.Parameter("format", inspect.Parameter.KEYWORD_ONLY, annotation=choices("Format", kind.formats),
                             default=typer.Option("json", "--format", "-f",
        help="what to print: " + " | ".join(kind.formats) + " (GET /jobs/{id}/result?format= gives the same)"))


def _offline_command(kind: JobKind) -> Callable[..., None]:
    extra = EXTRA_OUTPUT.get(kind.name)
    # kinds whose result renders to more than JSON (diarization: RTTM, SRT, WebVTT)
    formats = len(kind.formats) > 1

    def command(**values: Any) -> None:
        files = {f.name: values.pop(f.name) for f in kind.files}
        extra_value = values.pop(extra[0]().name) if extra else None
        output_format = plain(values.pop("format")) if formats else "json"
        if output_format != "json" and str(extra_value) == "-":
            err.print(f"[red]--rttm -[/red] and [red]--format {output_format}[/red] both want stdout: pick one")
            raise typer.Exit(2)
        # before the models load and run: a path that cannot be written failed only after them
        extra_flag = "--" + extra[0]().name if extra else ""
        if extra:
            check_output(extra_value, extra_flag)

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        try:
            params, audio = read_inputs(kind, files, values)
            settings = engine_settings(audio)
            # after the inputs are read and the audio's headers looked at: importing the engine
            # (torch, pyannote) takes seconds, which a mistake in the arguments was answered only after
            from engine.core import Engine

            engine = Engine(settings)
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TimeElapsedColumn(), console=err, transient=True) as bar:
                task = bar.add_task("loading", total=1.0)
                result = kind.run(engine, audio, params,
                                  lambda step, frac: bar.update(task, completed=frac, description=step))
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        try:
            # --rttm FILE is written with any --format
            printed = extra[1](result, files, extra_value) if extra else False
        except OSError as exc:  # permission denied, disk full
            usage_error(f"{extra_flag} {extra_value}", exc.strerror or type(exc).__name__)
        if output_format != "json":
            uri = next(iter(audio.values())).stem if audio else "audio"
            typer.echo(kind.render(result.model_dump(mode="json"), output_format, uri=uri), nl=False)
            return
        if printed:
            return
        typer.echo(result.model_dump_json(indent=2))

    arguments = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=List[Path] if f.multiple else Path,
                          default=typer.Argument(..., exists=True, dir_okay=False, help=f.description))
        for f in kind.files
    ]
    params = arguments + option_parameters(kind.form_fields, required=True) + ([extra[0]()] if extra else [])
    params += [_format_option(kind)] if formats else []
    command.__doc__ = f"{kind.summary}. Prints JSON (the body of POST /jobs/{kind.name}'s result)" + (
        f", or with --format {' | '.join(kind.formats[1:])}." if formats else "."
    )
    return set_signature(command, params)


for _kind in KINDS.values():
    app.command(name=COMMAND_NAMES.get(_kind.name, _kind.name.replace("_", "-")))(_offline_command(_kind))


def _register_service_commands() -> None:
    # up / submit live with the service code
    from cli import service

    service.register(app)


_register_service_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
