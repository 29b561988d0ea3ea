"""The original synchronous contract, served by enqueueing to the workers and waiting."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Request, UploadFile

from api.deps import Principal, require_api_key
from api.forms import check_embedding_file, diarize_params, embedding_params, threshold_params
from api.models import ERRORS
from shared.schemas import CompareResponse, DiarizationResponse, EmbeddingResponse

router = APIRouter(tags=["synchronous"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def _dispatcher(request: Request):
    return request.app.state.dispatcher


@router.post("/diarize", response_model=DiarizationResponse, summary="Who spoke when")
async def diarize(
    request: Request, file: UploadFile = File(...), params: dict[str, Any] = Depends(diarize_params),
    principal: Principal = Depends(require_api_key),
) -> dict[str, Any]:
    return await _dispatcher(request).run_sync("diarize", {"file": file}, params, principal, request)


@router.post("/embedding", response_model=EmbeddingResponse, summary="192-dim speaker embedding")
async def embedding(
    request: Request, file: UploadFile = File(...), params: dict[str, Any] = Depends(embedding_params),
    principal: Principal = Depends(require_api_key),
) -> dict[str, Any]:
    return await _dispatcher(request).run_sync("embedding", {"file": file}, params, principal, request)


@router.post("/compare", response_model=CompareResponse, summary="Are two recordings the same speaker")
async def compare(
    request: Request,
    file1: UploadFile = File(...),
    file2: UploadFile = File(...),
    params: dict[str, Any] = Depends(threshold_params),
    principal: Principal = Depends(require_api_key),
) -> dict[str, Any]:
    return await _dispatcher(request).run_sync("compare", {"file1": file1, "file2": file2}, params, principal, request)


@router.post("/compare_embedding", response_model=CompareResponse, summary="Compare audio with a stored embedding")
async def compare_embedding(
    request: Request,
    audio: UploadFile = File(...),
    embedding: UploadFile = File(..., description="stored embedding: .npy, JSON array or a (safely read) pickle"),
    params: dict[str, Any] = Depends(threshold_params),
    principal: Principal = Depends(require_api_key),
) -> dict[str, Any]:
    await check_embedding_file(embedding)
    return await _dispatcher(request).run_sync(
        "compare_embedding", {"audio": audio, "embedding": embedding}, {**params, "embedding_filename": embedding.filename},
        principal, request,
    )
