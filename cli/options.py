"""A parameter model's fields as typer options, and signatures typer reads from a declaration."""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from shared.formats import one_line

_err = Console(stderr=True)


def option_parameters(fields: dict[str, Any], *, required: bool = False) -> list[inspect.Parameter]:
    """A parameter model's fields as typer options (``num_speakers`` -> ``--num-speakers``).

    With ``required`` (one kind's command), a field the kind cannot run without is a required
    option (``enroll --label``, ``identify --voiceprints``): the help says so, and leaving it out
    is typer's "Missing option '--label'" before any model loads, where it was ``label: Field
    required`` once the command had loaded them."""
    out = []
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            option = typer.Option(field.default, f"{flag}/--no-{flag[2:]}", help=field.description)
            annotation: Any = bool
        elif required and field.is_required():
            option = typer.Option(..., flag, help=field.description)
            annotation = field.annotation
        else:
            option = typer.Option(None, flag, help=field.description)
            annotation = Optional[field.annotation]  # noqa: UP045 - typer reads Optional
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return out


def set_signature(func: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def choices(name: str, values: tuple[str, ...] | list[str]) -> type[enum.Enum]:
    """A str Enum of ``values``: typer offers an Enum annotation as a choice (``--format srt``)."""
    return enum.Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def plain(value: Any) -> Any:
    """A choice's string (typer hands over the Enum member)."""
    return value.value if isinstance(value, enum.Enum) else value


def usage_error(what: str, why: str) -> NoReturn:
    """A caller's mistake in one line on stderr and exit 2, as typer's own usage errors exit,
    instead of a traceback (``submit a.wav b.m4a`` ended in "ValueError: diarize takes 1
    file(s)" under rich's traceback, exit 1). ``what`` and ``why`` are printed literally."""
    # one line whatever a path holds (its newlines, a terminal's escape sequences)
    _err.print(f"[red]{escape(one_line(what))}[/red]: {escape(one_line(why))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def check_output(path: Path | None, option: str) -> None:
    """Refuse (usage error) an output file that cannot be written where it is named: a folder,
    or a file in a folder that does not exist. Checked before the work, not after it: ``embed
    -o missing/x.npy`` ran the model and then crashed with FileNotFoundError."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        usage_error(f"{option} {path}", "is a directory (name a file)")
    if not path.parent.is_dir():
        usage_error(f"{option} {path}", f"no such directory {path.parent}")
