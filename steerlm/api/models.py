"""GET /v1/models and GET /health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from steerlm.api.service import Service

router = APIRouter()


def _card(service: Service, created: int) -> dict:
    return {"id": service.served_name, "object": "model", "created": created, "owned_by": "steerlm"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(request.app.state.service, request.app.state.started)]}


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request) -> dict:
    service: Service = request.app.state.service
    service.check_model(model)
    return _card(service, request.app.state.started)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the ensemble behind the API is ready to answer, 503 before."""
    ensemble = request.app.state.service.ensemble
    if await ensemble.ready():
        return JSONResponse({"status": "ok", "triton": ensemble.grpc_url, "model": ensemble.model})
    return JSONResponse({"status": "unavailable", "triton": ensemble.grpc_url, "model": ensemble.model},
                        status_code=503)
