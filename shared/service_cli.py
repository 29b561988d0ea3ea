"""Service commands of the CLI (``up``, ``submit``): filled in by the job-queue service work."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``audio-analysis`` app."""
