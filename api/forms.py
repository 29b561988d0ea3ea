"""Form parameters of the contract, validated before anything is stored or enqueued."""

from __future__ import annotations

from typing import Any

from fastapi import Form


def diarize_params(
    num_speakers: int | None = Form(None, description="exact number of speakers (overrides min/max)"),
    min_speakers: int | None = Form(None),
    max_speakers: int | None = Form(None),
    min_duration: float | None = Form(None, description="drop segments shorter than this (seconds)"),
) -> dict[str, Any]:
    from engine.core import validate_speaker_bounds

    validate_speaker_bounds(num_speakers, min_speakers, max_speakers, min_duration)
    return {
        "num_speakers": num_speakers, "min_speakers": min_speakers,
        "max_speakers": max_speakers, "min_duration": min_duration,
    }


def embedding_params(normalize: bool = Form(True, description="L2-normalise the vector")) -> dict[str, Any]:
    return {"normalize": normalize}


def threshold_params(
    threshold: float | None = Form(
        None,
        description="cosine threshold in [-1, 1]; default: calibrated for the active model "
        "(0.25 for the production ECAPA model, as in the original contract)",
    ),
) -> dict[str, Any]:
    # omitted -> None, so the worker's engine applies the threshold calibrated for its model:
    # the contract's 0.25 was calibrated for ECAPA and accepts most impostors with CAM++
    if threshold is not None:
        from engine.core import validate_threshold

        validate_threshold(threshold)
    return {"threshold": threshold}


def webhook_param(
    webhook_url: str | None = Form(None, description="POSTed the job record, signed, when the job ends"),
) -> str | None:
    return webhook_url or None


# a 192-float vector is a few KiB in any format; anything far larger is not an embedding file
MAX_EMBEDDING_FILE_BYTES = 1024 * 1024


async def check_embedding_file(upload: Any) -> None:
    """Parse the stored embedding now so a bad file is a 4xx at submit, not a failed job later."""
    from starlette.concurrency import run_in_threadpool

    from shared.embedding_file import load_embedding  # owned by the verification work
    from shared.errors import InputError

    data = await upload.read(MAX_EMBEDDING_FILE_BYTES + 1)
    if len(data) > MAX_EMBEDDING_FILE_BYTES:
        raise InputError(f"embedding file is larger than {MAX_EMBEDDING_FILE_BYTES} bytes")
    await run_in_threadpool(load_embedding, data, upload.filename)
    await upload.seek(0)
