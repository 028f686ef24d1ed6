"""DICOMweb STOW-RS receiver (DICOM PS3.18 10.5): a PACS or modality pushes instances here.

``POST /dicomweb/studies[/{study}]`` with ``multipart/related; type="application/dicom"``. Each
instance's header is parsed (pydicom); instances are grouped by SeriesInstanceUID into
``<data_dir>/stow/<series key>/`` and recorded in the job store. A series whose last instance
arrived more than ``stow_quiet_s`` seconds ago is complete: if its modality fits the STOW model it
becomes a job (owned by the key that sent it), and its SEG is pushed back to the configured PACS
when the job finishes. Instances of other modalities (e.g. our own SEGs echoed back) are
acknowledged and dropped.

The response is the PS3.18 Store Instances Response Module in DICOM JSON: ReferencedSOPSequence
and FailedSOPSequence with FailureReason; 200 when all were stored, 202 when some failed, 409
when none could be stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from medseg.errors import MedsegError
from medseg.package import resolve_model
from service import jobs as job_ops
from service.auth import Principal, require
from service.config import Settings
from service.models import JobInput, JobOptions, default_results
from service.problems import Problem, problem_responses
from service.store import Store, StowSeries
from service.uploads import Received, multipart_boundary, receive_multipart

log = logging.getLogger("medseg.service.stow")
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
# PS3.18 Table I.2-2 / PS3.4 failure reasons
CANNOT_UNDERSTAND, OUT_OF_RESOURCES, DOES_NOT_MATCH = 0xC000, 0xA700, 0xA900
_UID = re.compile(r"^[0-9.]{1,64}$")
_lock = threading.Lock()  # serialises series bookkeeping with the quiet-period flush

STOW_BODY = {
    "required": True,
    "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}},
}
STOW_RESPONSES = {
    200: {"description": "all instances stored", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances stored, others failed", "content": {DICOM_JSON: {}}},
    409: {"description": "no instance could be stored", "content": {DICOM_JSON: {}}},
    **problem_responses(400, 401, 403, 408, 413, 415, 503),
}


def _series_key(owner: str, series_uid: str) -> str:
    return hashlib.sha256(f"{owner}|{series_uid}".encode()).hexdigest()[:32]


@router.post(
    "/studies",
    summary="STOW-RS: store instances",
    status_code=200,
    openapi_extra={"requestBody": STOW_BODY},
    responses=STOW_RESPONSES,
)
async def stow_studies(request: Request, principal: Principal = Depends(require("submit"))):
    return await _stow(request, principal, None)


@router.post(
    "/studies/{study_uid}",
    summary="STOW-RS: store instances of one study",
    status_code=200,
    openapi_extra={"requestBody": STOW_BODY},
    responses=STOW_RESPONSES,
)
async def stow_study(request: Request, study_uid: str, principal: Principal = Depends(require("submit"))):
    return await _stow(request, principal, study_uid)


async def _stow(request: Request, principal: Principal, study_uid: str | None) -> JSONResponse:
    state = request.app.state
    settings: Settings = state.settings
    _, params = multipart_boundary(request, "related")
    part_type = params.get(b"type", b"application/dicom").decode("latin-1").lower()
    if part_type != "application/dicom":
        raise Problem(
            415, "unsupported-media-type", f"STOW-RS accepts type=\"application/dicom\" parts, not '{part_type[:60]}'"
        )
    model = settings.stow_model or settings.default_model
    try:
        card = resolve_model(model, allow_path=False).card
    except MedsegError:
        raise Problem(503, "unavailable", f"the STOW-RS model '{model}' is not installed") from None
    batch = settings.incoming_dir / f"stow-{uuid.uuid4().hex}"
    received = await receive_multipart(request, batch, settings, "related", file_field=None)
    state.metrics.received_bytes.labels("stow").inc(received.size)
    try:
        if not received.files:
            raise Problem(400, "bad-request", "STOW-RS request without any instance")
        body, stored, failed = await run_in_threadpool(
            store_instances, received, state.store, settings, principal.key_id, study_uid, card
        )
    finally:
        shutil.rmtree(batch, ignore_errors=True)
    state.metrics.stow_instances.labels("stored").inc(stored)
    state.metrics.stow_instances.labels("failed").inc(failed)
    status = 200 if not failed else (202 if stored else 409)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def store_instances(
    received: Received, store: Store, settings: Settings, owner: str, study_uid: str | None, card
) -> tuple[dict, int, int]:
    """File each received instance under its series; returns (response body, stored, failed).

    Instances whose modality does not fit ``card`` are acknowledged and dropped, by the same rule
    as ``medseg predict`` (:func:`medseg.inference.matching.modality_mismatch`: an empty Modality
    fits)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medseg.inference.matching import modality_mismatch

    referenced: list[dict] = []
    failures: list[dict] = []
    ignored = 0
    for part in received.files:
        try:
            ds = pydicom.dcmread(part.path, stop_before_pixels=True)
            sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            series_uid, study = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
        except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError, KeyError, TypeError):
            failures.append(_sop_item("", "", CANNOT_UNDERSTAND))
            continue
        if not all(_UID.match(u) for u in (sop_uid, series_uid, study)):
            failures.append(_sop_item(sop_class, sop_uid[:64], CANNOT_UNDERSTAND))
            continue
        if study_uid is not None and study != study_uid:
            failures.append(_sop_item(sop_class, sop_uid, DOES_NOT_MATCH))
            continue
        modality = str(ds.get("Modality") or "").upper()
        if modality_mismatch(modality, card):
            ignored += 1  # acknowledged, not for this model (e.g. our own SEG echoed back)
            referenced.append(_sop_item(sop_class, sop_uid))
            continue
        if not _file_instance(store, settings, owner, part.path, sop_uid, series_uid, study, modality):
            failures.append(_sop_item(sop_class, sop_uid, OUT_OF_RESOURCES))
            continue
        referenced.append(_sop_item(sop_class, sop_uid))
    body: dict[str, Any] = {}
    if failures:
        body["00081198"] = {"vr": "SQ", "Value": failures}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    log.info(
        "stow received",
        extra={"key_id": owner, "stored": len(referenced) - ignored, "ignored": ignored, "failed": len(failures)},
    )
    return body, len(referenced), len(failures)


def _sop_item(sop_class: str, sop_uid: str, reason: int | None = None) -> dict:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [sop_uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _file_instance(
    store: Store,
    settings: Settings,
    owner: str,
    path: Path,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    modality: str,
) -> bool:
    """Move one instance into its series folder and record it; False past ``max_instances``.

    The row is written (and flushed, which takes the store's write lock) before the file moves,
    and the move is undone if the commit then fails: the instance and its row are stored together
    or not at all. The count is the number of files in the series folder, so a retried instance
    (same SOPInstanceUID) counts once.

    Raises:
        sqlalchemy.exc.OperationalError: the store is locked or down (503, the sender retries).
    """
    key = _series_key(owner, series_uid)
    folder = settings.stow_dir / key
    target = folder / f"{sop_uid}.dcm"
    now = time.time()
    with _lock:
        for _ in range(2):
            moved = False
            try:
                with store.session() as session:
                    row = session.get(StowSeries, key)
                    if row is None:
                        row = StowSeries(
                            key=key,
                            owner=owner,
                            series_uid=series_uid,
                            study_uid=study_uid,
                            modality=modality,
                            instances=0,
                            first_at=now,
                            last_at=now,
                            state="collecting",
                        )
                        session.add(row)
                    elif row.state != "collecting":  # sent again after its job was made
                        row.state, row.first_at, row.job_id = "collecting", now, None
                    stored = _stored_instances(folder)
                    is_new = not target.exists()
                    if is_new and stored >= settings.max_instances:
                        return False
                    row.instances = stored + int(is_new)
                    row.last_at = now
                    session.flush()
                    folder.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                    moved = is_new
                return True
            except IntegrityError:  # another process created the row first: retry as update
                if moved:
                    os.replace(target, path)
                continue
            except BaseException:
                if moved:  # the row was not committed: neither is the instance
                    os.replace(target, path)
                raise
    return False


def _stored_instances(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.dcm")) if folder.is_dir() else 0


def _claim_series(store: Store, key: str, cutoff: float) -> bool:
    """Move one quiet series from ``collecting`` to ``submitting`` with one conditional UPDATE, so
    that of several API replicas flushing at once exactly one makes its job."""
    from sqlalchemy import update

    with store.session() as session:
        statement = (
            update(StowSeries)
            .where(StowSeries.key == key, StowSeries.state == "collecting", StowSeries.last_at < cutoff)
            .values(state="submitting")
        )
        return session.execute(statement).rowcount == 1


def _set_series(store: Store, key: str, **values) -> None:
    with store.session() as session:
        row = session.get(StowSeries, key)
        if row is not None:
            for name, value in values.items():
                setattr(row, name, value)


def flush_quiet_series(store: Store, settings: Settings, queue, metrics) -> list[str]:
    """Turn every series quiet for ``stow_quiet_s`` into a queued job; returns the job ids."""
    cutoff = time.time() - settings.stow_quiet_s
    model = settings.stow_model or settings.default_model
    created = []
    with _lock:
        with store.session() as session:
            rows = list(
                session.scalars(select(StowSeries).where(StowSeries.state == "collecting", StowSeries.last_at < cutoff))
            )
        for row in rows:
            if not _claim_series(store, row.key, cutoff):
                continue  # another replica is turning it into a job
            series_dir = settings.stow_dir / row.key
            job_id = job_ops.new_job_id()
            instances = _stored_instances(series_dir)  # what is on disk, not a counter
            if instances:
                # not opened here: the worker reads it (and decides its fit) when the job runs
                job_input = JobInput(
                    kind="dicom",
                    path="input",
                    series_uid=row.series_uid,
                    study_uid=row.study_uid,
                    modality=row.modality,
                    instances=instances,
                )
                try:
                    job_ops.create_job(
                        store,
                        settings,
                        job_id=job_id,
                        owner=row.owner,
                        source="stow",
                        model=model,
                        job_input=job_input,
                        input_dir=series_dir,
                        options=JobOptions(formats=default_results("dicom")),
                    )
                except BaseException:  # the series stays on disk: collect it again next time
                    _set_series(store, row.key, state="collecting")
                    raise
                created.append(job_id)
            with store.session() as session:
                current = session.get(StowSeries, row.key)
                current.state, current.job_id = "submitted", job_id if job_id in created else None
    for job_id in created:
        metrics.submitted.labels("stow").inc()
        queue.submit(job_id)
    return created
