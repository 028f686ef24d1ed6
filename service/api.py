"""The REST API: ``/v1/jobs``, ``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import shutil
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from medseg.errors import MedsegError
from medseg.package import MODEL_NAME_PATTERN, list_models, resolve_model
from service import jobs as job_ops
from service.auth import Principal, require
from service.inputs import parse_options, prepare_input
from service.pipeline import MEDIA_TYPES, RESULT_FORMATS
from service.problems import Problem, problem_responses
from service.store import EXPIRED, STATES, SUCCEEDED
from service.uploads import receive_multipart

router = APIRouter()


def _validation_limiter(state) -> anyio.CapacityLimiter:
    """At most ``settings.max_validations`` uploads are read and checked at the same time (each
    may hold a whole series in memory); the others wait their turn."""
    limiter = getattr(state, "validation_limiter", None)
    if limiter is None:
        limiter = state.validation_limiter = anyio.CapacityLimiter(state.settings.max_validations)
    return limiter


ResultName = Literal[tuple(RESULT_FORMATS)]  # type: ignore[valid-type]

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "format": "binary"},
                        "description": "one NIfTI/NRRD/MHA file, one ZIP of DICOM files, or DICOM files",
                    },
                    "model": {
                        "type": "string",
                        "pattern": MODEL_NAME_PATTERN,
                        "description": "a registered model name (GET /v1/models)",
                    },
                    "series_uid": {"type": "string", "description": "series to segment if several"},
                    "tta": {"type": "boolean", "description": "test-time augmentation"},
                    "overlap": {"type": "number", "minimum": 0, "maximum": 0.9},
                    "formats": {"type": "string", "description": "comma-separated: " + ",".join(RESULT_FORMATS)},
                },
            }
        }
    },
}


class ModelView(BaseModel):
    name: str
    version: str
    description: str
    modality: list[str]
    labels: list[dict[str, Any]]
    spacing: list[float]
    default: bool
    weights_sha256: str | None = None
    trained_at: str | None = None


@router.get("/healthz", tags=["health"], summary="Liveness (no key needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness (no key needed)", responses=problem_responses(503))
def readyz(request: Request) -> dict[str, Any]:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        state.store.check_writable()
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unavailable ({type(error).__name__})"
    try:
        resolve_model(state.settings.default_model, allow_path=False)
        checks["default_model"] = "ok"
    except MedsegError:
        checks["default_model"] = f"'{state.settings.default_model}' not found"
    if state.settings.broker_url:  # an API replica that enqueues on a Celery broker
        try:
            state.queue.check_reachable()
            checks["broker"] = "ok"
        except Exception as error:
            checks["broker"] = f"unreachable ({type(error).__name__})"
    alive, wanted = state.pool.alive, state.settings.workers
    checks["workers"] = "ok" if alive == wanted else f"{alive} of {wanted} running"
    for name in ("incoming_dir", "jobs_dir", "stow_dir"):
        checks[name] = "ok" if _writable(getattr(state.settings, name)) else "not writable"
    if any(v != "ok" for v in checks.values()):
        raise Problem(
            503,
            "unavailable",
            "service not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
            checks=checks,
        )
    return {"status": "ready", "checks": checks}


def _writable(folder) -> bool:
    """A file can be created in ``folder`` now (``os.access`` is not enough: root, read-only
    mounts, a full disk)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-"):
            return True
    except OSError:
        return False


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics (admin keys only: the counts cover every tenant)",
    response_class=Response,
    responses=problem_responses(401, 403),
)
def metrics(request: Request, _: Principal = Depends(require("admin"))) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["models"], summary="Models this service can run", responses=problem_responses(401, 403))
def models(request: Request, _: Principal = Depends(require("read"))) -> list[ModelView]:
    default = request.app.state.settings.default_model
    views = []
    for name in dict.fromkeys(list_models()):
        try:
            card = resolve_model(name, allow_path=False).card
        except MedsegError:
            continue
        views.append(
            ModelView(
                name=name,
                version=card.version,
                description=card.description,
                modality=list(card.modality),
                spacing=list(card.spacing),
                default=name == default,
                weights_sha256=card.weights_sha256,
                trained_at=card.trained_at,
                labels=[{"id": l.id, "name": l.name, "color": list(l.color)} for l in card.labels],
            )
        )
    return views


@router.post(
    "/v1/jobs",
    tags=["jobs"],
    status_code=202,
    summary="Upload an image; queue a job",
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses=problem_responses(400, 401, 403, 404, 408, 413, 415, 422),
)
async def submit_job(
    request: Request, response: Response, principal: Principal = Depends(require("submit"))
) -> job_ops.JobView:
    state = request.app.state
    settings, store, metrics = state.settings, state.store, state.metrics
    job_id = job_ops.new_job_id()
    upload_dir = settings.incoming_dir / job_id
    try:
        received = await receive_multipart(request, upload_dir, settings, "form-data")
    except (Problem, MedsegError) as error:
        metrics.rejected.labels(getattr(error, "code", "error")).inc()
        raise
    metrics.received_bytes.labels("jobs").inc(received.size)
    try:
        options = parse_options(received.fields)
        model = options.model or settings.default_model
        package = resolve_model(model, allow_path=False)
        job_input = await anyio.to_thread.run_sync(
            prepare_input, received, upload_dir, settings, package.card, options, limiter=_validation_limiter(state)
        )
        job = await run_in_threadpool(
            job_ops.create_job,
            store,
            settings,
            job_id=job_id,
            owner=principal.key_id,
            source="upload",
            model=model,
            job_input=job_input,
            input_dir=upload_dir,
            options=options,
        )
    except (Problem, MedsegError) as error:
        metrics.rejected.labels(getattr(error, "code", "error")).inc()
        raise
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)  # moved into the job, or refused
    metrics.submitted.labels("upload").inc()
    state.queue.submit(job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_ops.job_view(job, store)


@router.get(
    "/v1/jobs", tags=["jobs"], summary="List jobs (own jobs; all for admin)", responses=problem_responses(401, 403)
)
def get_jobs(
    request: Request,
    principal: Principal = Depends(require("read")),
    state: Literal[STATES] | None = Query(None),  # type: ignore[valid-type]
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=10**9),
) -> job_ops.JobPage:
    store = request.app.state.store
    rows, total = job_ops.list_jobs(store, principal, state, limit, offset)
    return job_ops.JobPage(items=[job_ops.job_view(j, store) for j in rows], total=total, limit=limit, offset=offset)


def _job_for(request: Request, job_id: str, principal: Principal):
    job = request.app.state.store.get_job(job_id) if len(job_id) <= 64 else None
    if not job_ops.visible(job, principal):
        raise Problem(404, "not-found", f"no job {job_id[:64]}")
    return job


@router.get(
    "/v1/jobs/{job_id}",
    tags=["jobs"],
    summary="A job's state, progress and timings",
    responses=problem_responses(401, 403, 404),
)
def get_job(request: Request, job_id: str, principal: Principal = Depends(require("read"))) -> job_ops.JobView:
    return job_ops.job_view(_job_for(request, job_id, principal), request.app.state.store)


@router.delete(
    "/v1/jobs/{job_id}",
    tags=["jobs"],
    status_code=204,
    response_class=Response,
    summary="Cancel a job and delete its data",
    responses=problem_responses(401, 403, 404),
)
def delete_job(request: Request, job_id: str, principal: Principal = Depends(require("submit"))) -> Response:
    job = _job_for(request, job_id, principal)
    job_ops.cancel_job(request.app.state.store, request.app.state.settings, job)
    return Response(status_code=204)


@router.get(
    "/v1/jobs/{job_id}/result/{name}",
    tags=["jobs"],
    response_class=FileResponse,
    summary="Download a result: " + ", ".join(f"{name} ({media})" for name, media in MEDIA_TYPES.items()),
    responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}}, **problem_responses(401, 403, 404, 409, 410)},
)
def get_result(
    request: Request, job_id: str, name: ResultName, principal: Principal = Depends(require("read"))
) -> FileResponse:
    job = _job_for(request, job_id, principal)
    if job.state == EXPIRED:
        raise Problem(410, "gone", f"job {job.id}: results deleted after the retention period")
    if job.state != SUCCEEDED:
        raise Problem(409, "not-ready", f"job {job.id} is {job.state}; results are available once it has succeeded")
    path = job_ops.result_path(request.app.state.settings, job, name)
    if path is None:
        raise Problem(
            404,
            "not-found",
            f"job {job.id} has no '{name}' result (formats: {', '.join(job.job_options().formats or [])})",
        )
    suffix = "".join(path.suffixes) or ""
    return FileResponse(path, media_type=MEDIA_TYPES[name], filename=f"{job.id}-{name}{suffix}")


__all__ = ["router"]
