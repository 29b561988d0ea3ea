"""A parameter model's fields as typer options, and signatures typer reads from a declaration."""

from __future__ import annotations

import enum
import inspect
from typing import Any, Callable, Optional

import typer


def option_parameters(fields: dict[str, Any]) -> list[inspect.Parameter]:
    """A parameter model's fields as typer options (``num_speakers`` -> ``--num-speakers``)."""
    out = []
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            option = typer.Option(field.default, f"{flag}/--no-{flag[2:]}", help=field.description)
            annotation: Any = bool
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
