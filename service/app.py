"""The FastAPI application: ``create_app(settings)``, started by ``medseg serve`` on uvicorn.

At start-up the job store is opened (created if needed), jobs this node was running when it
last stopped are re-queued, and the worker pool and the maintenance thread start. At shut-down
workers stop and their running jobs go back to the queue.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

import medseg
from service import api, dicomweb, web
from service.auth import Principal, require
from service.config import Settings
from service.maintenance import Maintenance
from service.metrics import Metrics
from service.problems import MEDIA_TYPE, PROBLEM_SCHEMA, install_handlers
from service.queue import StoreQueue
from service.store import Store
from service.workers import WorkerPool

log = logging.getLogger("medseg.service")


def create_app(settings: Settings) -> FastAPI:
    """The service app for ``settings`` (nothing starts until the ASGI lifespan begins)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for folder in (settings.data_dir, settings.jobs_dir, settings.incoming_dir, settings.stow_dir):
            folder.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_url)
        queue = StoreQueue(store)
        metrics = Metrics(store)
        pool = WorkerPool(settings, store, queue, metrics)
        state = app.state
        state.settings, state.store, state.queue, state.metrics, state.pool = (settings, store, queue, metrics, pool)
        requeued = store.requeue_interrupted(settings.lease_s, node=settings.node_id)
        for job_id in requeued:
            log.warning("job re-queued after restart", extra={"job_id": job_id})
        maintenance = Maintenance(state)
        pool.start()
        maintenance.start()
        log.info(
            "service started",
            extra={
                "workers": settings.workers,
                "node": settings.node_id,
                "requeued": len(requeued),
                "database": store.engine.dialect.name,
            },
        )
        try:
            yield
        finally:
            maintenance.stop()
            pool.stop()
            store.dispose()
            log.info("service stopped")

    app = FastAPI(
        title="medseg service",
        version=medseg.__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,  # the schema is served behind a key
        description="Segment medical images: upload a study (or push it over DICOMweb STOW-RS), "
        "get a DICOM SEG, a NIfTI label map, a JSON volume report and a preview. "
        "Every endpoint except /healthz and /readyz needs `Authorization: Bearer <key>`."
        " Errors are RFC 9457 problem+json.",
    )
    app.state.settings = settings
    install_handlers(app)
    app.include_router(api.router)
    app.include_router(dicomweb.router)
    app.include_router(web.router)  # GET / (the web page), /static/, the viewer's input NIfTI
    app.add_middleware(RequestLog)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Location"],
        )

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
            app.openapi_schema = problem_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_document(_: Principal = Depends(require("read"))) -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def problem_openapi(schema: dict) -> dict:
    """Make the generated schema say what is served: every 422 is problem+json (FastAPI documents
    its own ``HTTPValidationError``, which the service never sends; it and ``ValidationError``
    are dropped once unused), every operation that needs a key may answer 503 with
    ``Retry-After`` (a storage fault), and an upload has at least one ``file``."""
    problem = {"$ref": "#/components/schemas/Problem"}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses") if isinstance(operation, dict) else None
            if not isinstance(responses, dict):
                continue
            if "422" in responses:  # only problem+json, whatever else FastAPI merged in
                responses["422"] = {"description": HTTPStatus(422).phrase, "content": {MEDIA_TYPE: {"schema": problem}}}
            if "401" in responses and "503" not in responses:
                responses["503"] = {
                    "description": "Service Unavailable (storage fault; retry later)",
                    "headers": {
                        "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
                    },
                    "content": {MEDIA_TYPE: {"schema": problem}},
                }
    upload = (
        schema.get("paths", {})
        .get("/v1/jobs", {})
        .get("post", {})
        .get("requestBody", {})
        .get("content", {})
        .get("multipart/form-data", {})
        .get("schema", {})
    )
    if isinstance(upload.get("properties", {}).get("file"), dict):
        upload["properties"]["file"].setdefault("minItems", 1)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the first refers to the second
        if name in components:
            rest = {
                **schema,
                "components": {**schema["components"], "schemas": {k: v for k, v in components.items() if k != name}},
            }
            if f'"#/components/schemas/{name}"' not in json.dumps(rest):
                del components[name]
    return schema


class RequestLog:
    """ASGI middleware: one JSON log line per request (method, route, status, ms; no bodies)."""

    def __init__(self, app):
        self.app = app
        self.log = logging.getLogger("medseg.service.http")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "route": getattr(route, "path", None) or scope.get("path"),
                    "status": status[0],
                    "ms": round((time.perf_counter() - start) * 1000, 1),
                },
            )
