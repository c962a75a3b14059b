"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: store and broker reachable)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from secateurs.app.api.deps import CeleryDep, StoreDep
from secateurs.app.queue import broker_reachable

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    store: Literal["ok", "unreachable"] | None = None
    broker: Literal["ok", "unreachable"] | None = None


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(store: StoreDep, celery: CeleryDep) -> Health | JSONResponse:
    try:
        await run_in_threadpool(store.ping)
        store_ok = True
    except Exception:  # any database error means "not ready"
        store_ok = False
    broker_ok = await run_in_threadpool(broker_reachable, celery)
    health = Health(
        status="ok" if store_ok and broker_ok else "unavailable",
        store="ok" if store_ok else "unreachable",
        broker="ok" if broker_ok else "unreachable",
    )
    if health.status == "ok":
        return health
    return JSONResponse(health.model_dump(), status_code=503)
