"""The web page: ``GET /`` (one page, its scripts and styles under ``/static/``) and the input
volume as NIfTI for its viewer, ``GET /v1/jobs/{id}/input.nii.gz``.

Everything the page loads is served here (NiiVue is vendored under ``static/vendor/niivue/``); no
CDN, no inline script or style, and a strict Content-Security-Policy on every response of this
router. The page keeps the API key in ``sessionStorage`` and sends it only as the Bearer header
(downloads and the viewer's volumes are fetched with the header and handed over as blobs or
ArrayBuffers), so the key never appears in a URL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from service.api import _job_for, _validation_limiter
from service.auth import Principal, require
from service.problems import Problem, problem_responses
from service.store import EXPIRED, SUCCEEDED

router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent / "static"
INPUT_NIFTI = "output/input.nii.gz"  # the cached conversion, relative to the job folder

# NiiVue draws its text from a font atlas and matcaps embedded as data: URLs (img-src data:);
# it needs no eval, no WebAssembly for NIfTI and no workers. Everything else is 'self' only.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".map": "application/json",
}


def _static_file(relative: str) -> Path:
    """``relative`` inside ``STATIC_DIR`` (resolved; links out of it refused), else 404."""
    path = (STATIC_DIR / relative).resolve()
    if (
        STATIC_DIR not in path.parents
        or not path.is_file()
        or path.suffix.lower() not in MEDIA
        or any(part.startswith(".") for part in path.relative_to(STATIC_DIR).parts)
    ):
        raise Problem(404, "not-found", f"no page file {relative[:200]}")
    return path


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(
        _static_file("index.html"), media_type=MEDIA[".html"], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    )


@router.get("/static/{relative:path}", include_in_schema=False)
def static(relative: str) -> FileResponse:
    path = _static_file(relative)
    # revalidated each time (ETag / Last-Modified): an upgraded service never runs a stale script
    return FileResponse(
        path, media_type=MEDIA[path.suffix.lower()], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    )


def _inside(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return folder in path.parents


def _convert_input(settings, job) -> Path:
    """Write (once) and return ``<job>/output/input.nii.gz``: the job's input read as at upload
    (``settings.read_policy``) and written by :func:`medseg.io.write_nifti` (atomically)."""
    from medseg.io import read_image, write_nifti

    job_dir = settings.jobs_dir / job.id
    target = job_dir / INPUT_NIFTI
    if not _inside(job_dir, target) or not (job_dir / "output").is_dir():
        raise Problem(404, "not-found", f"job {job.id} has no output folder")
    if target.is_file():
        return target
    job_input = job.job_input()
    source = job_dir / job_input.path
    if not (job.input or {}).get("path") or not _inside(job_dir, source) or not source.exists():
        raise Problem(404, "not-found", f"job {job.id} has no stored input")
    image = read_image(source, series_uid=job_input.series_uid, policy=settings.read_policy)
    # free text typed at the scanner (it may name the patient): not written into the file
    image.meta = {k: v for k, v in image.meta.items() if k != "series_description"}
    try:
        write_nifti(image, target, label_map=False)
    except FileNotFoundError:  # the job was deleted meanwhile
        raise Problem(404, "not-found", f"no job {job.id}") from None
    return target


@router.get(
    "/v1/jobs/{job_id}/input.nii.gz",
    tags=["jobs"],
    response_class=FileResponse,
    summary="The job's input volume as NIfTI (for the web page's viewer)",
    responses={200: {"content": {"application/gzip": {}}}, **problem_responses(401, 403, 404, 409, 410)},
)
async def get_input_nifti(
    request: Request, job_id: str, principal: Principal = Depends(require("read"))
) -> FileResponse:
    state = request.app.state
    settings = state.settings
    job = await anyio.to_thread.run_sync(_job_for, request, job_id, principal)
    if job.state == EXPIRED:
        raise Problem(410, "gone", f"job {job.id}: data deleted after the retention period")
    if job.state != SUCCEEDED:  # the worker replaces output/ until then
        raise Problem(
            409, "not-ready", f"job {job.id} is {job.state}; its input volume is available once it has succeeded"
        )
    path = await anyio.to_thread.run_sync(_convert_input, settings, job, limiter=_validation_limiter(state))
    if await anyio.to_thread.run_sync(state.store.get_job, job.id) is None:
        # deleted while converting: do not leave a file behind in a removed job folder
        shutil.rmtree(settings.jobs_dir / job.id, ignore_errors=True)
        raise Problem(404, "not-found", f"no job {job.id}")
    if not path.is_file() or not _inside(settings.jobs_dir / job.id, path):
        raise Problem(404, "not-found", f"no job {job.id}")
    return FileResponse(
        path,
        media_type="application/gzip",
        filename=f"{job.id}-input.nii.gz",
        headers={"Cache-Control": "private, no-store"},
    )


__all__ = ["router", "CSP", "SECURITY_HEADERS"]
