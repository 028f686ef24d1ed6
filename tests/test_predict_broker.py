"""``medseg predict --broker``: a batch goes to the Celery queue of real ``medseg worker``
processes and comes back into ``--output`` as a local run writes it.

A real ``redis-server`` and a real PostgreSQL job store (both started by the fixtures of
:mod:`tests.test_service_scale_out` on loopback ports in temporary folders), one ``medseg worker``
subprocess and ``medseg predict`` subprocesses, over real inputs: the DICOM series
``dicom/hippocampus_crop_study1`` and hippocampus NIfTI cases of ``hippocampus/imagesTr``. The
label maps gathered from the workers are voxel-equal to those of a local ``medseg predict`` with
the same model; a job the worker fails is reported with its problem detail while the other series
are gathered; a second run with ``--skip-existing`` submits nothing. Skips, saying why, without
``redis-server``, PostgreSQL, Celery or the shared data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom

from tests.conftest import shared_path
from tests.test_service_scale_out import (  # noqa: F401  (pytest fixtures)
    Worker,
    _fresh_database,
    postgres_url,
    redis_url,
)
from tests.test_service_support import REPO, TINY_MODEL, build_tiny_model

#: the worker refuses series declaring more voxels than this: hippocampus_014 (78,000) fails on
#: the worker, the crop series (57,120), hippocampus_001 (62,475) and _004 (71,136) do not
WORKER_MAX_VOXELS = 75_000


def _predict(models, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDSEG_MODEL_PATH": str(models), "OMP_NUM_THREADS": "1"}
    for name in list(env):
        if name.startswith("MEDSEG_SERVICE_"):
            del env[name]  # only the flags given here
    return subprocess.run(
        [sys.executable, "-m", "medseg", "predict", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _started(worker: Worker) -> list[str]:
    return [r["job_id"] for r in worker.records() if r.get("msg") == "job started"]


def test_predict_broker_gathers_what_a_local_run_writes(redis_url, postgres_url, tmp_path):  # noqa: F811
    crop = shared_path("dicom", "hippocampus_crop_study1")
    images = shared_path("hippocampus", "imagesTr")
    good = [str(crop), str(images / "hippocampus_001.nii.gz"), str(images / "hippocampus_004.nii.gz")]
    too_big = str(images / "hippocampus_014.nii.gz")
    models = build_tiny_model(tmp_path / "models")
    database = _fresh_database(postgres_url, "predict_broker")
    data = tmp_path / "shared"
    data.mkdir()
    scale = ["--broker", redis_url, "--database-url", database, "--data-dir", str(data)]

    started = time.monotonic()
    local = _predict(models, *good, "--model", TINY_MODEL, "--output", str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout + local.stderr
    local_s = time.monotonic() - started

    worker = Worker(
        "w1",
        data,
        models,
        {
            "MEDSEG_SERVICE_DATABASE_URL": database,
            "MEDSEG_SERVICE_BROKER_URL": redis_url,
            "MEDSEG_SERVICE_MAX_VOXELS": str(WORKER_MAX_VOXELS),
        },
    ).start()
    out = tmp_path / "out"
    try:
        started = time.monotonic()
        run = _predict(models, *good, too_big, "--model", TINY_MODEL, "--output", str(out), *scale)
        broker_s = time.monotonic() - started
        # the worker failed one job: its problem detail on stderr, exit 1, the others gathered
        assert run.returncode == 1, run.stdout + run.stderr
        assert "4 series submitted" in run.stderr, run.stderr
        failed = [line for line in run.stderr.splitlines() if line.startswith("failed")]
        assert len(failed) == 1 and "hippocampus_014" in failed[0] and "78000" in failed[0], run.stderr
        assert "3 segmented, 0 already done, 0 skipped, 1 failed" in run.stdout, run.stdout

        # same names, same label maps, as the local run; nothing half-written, nothing left over
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
        maps = sorted(out.glob("*.nii.gz"))
        assert len(maps) == 3
        for path in maps:
            gathered = nib.load(str(path))
            expected = nib.load(str(tmp_path / "local" / path.name))
            assert np.array_equal(np.asarray(gathered.dataobj), np.asarray(expected.dataobj)), path.name
            np.testing.assert_allclose(gathered.affine, expected.affine, atol=1e-5)
        (seg,) = out.glob("*.seg.dcm")
        source_uid = pydicom.dcmread(next(crop.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        assert pydicom.dcmread(seg, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID == (
            source_uid
        )
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        assert list((data / "jobs").iterdir()) == [] and list((data / "incoming").iterdir()) == []
        from service.store import Job, Store

        store = Store(database)
        try:
            with store.session() as session:
                assert session.query(Job).count() == 0  # gathered jobs are deleted
        finally:
            store.dispose()
        runs = _started(worker)
        assert len(runs) == 4 and len(set(runs)) == 4, runs

        # resume: every series already has its report, so nothing is submitted
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = _predict(models, *good, "--model", TINY_MODEL, "--output", str(out), "--skip-existing", *scale)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "0 segmented, 3 already done, 0 skipped, 0 failed" in again.stdout, again.stdout
        assert "0 series submitted" in again.stderr, again.stderr
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        time.sleep(1.0)
        assert _started(worker) == runs
    finally:
        worker.stop()
    print(f"\nlocal predict {local_s:.1f} s; predict --broker (4 series, 1 worker) {broker_s:.1f} s")


def test_predict_broker_refuses_bad_settings_before_any_work(redis_url, tmp_path):  # noqa: F811
    models = build_tiny_model(tmp_path / "models")
    image = str(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    out = tmp_path / "out"
    no_data_dir = _predict(models, image, "--model", TINY_MODEL, "--output", str(out), "--broker", redis_url)
    assert no_data_dir.returncode == 2 and "--data-dir" in no_data_dir.stderr, no_data_dir.stderr
    by_path = _predict(
        models,
        image,
        "--model",
        str(models / TINY_MODEL),
        "--output",
        str(out),
        "--broker",
        redis_url,
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert by_path.returncode == 2 and "registered model name" in by_path.stderr, by_path.stderr
    unreachable = _predict(
        models,
        image,
        "--model",
        TINY_MODEL,
        "--output",
        str(out),
        "--broker",
        "redis://127.0.0.1:1/0",
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert unreachable.returncode == 2 and "broker unreachable" in unreachable.stderr, unreachable.stderr
    with_spacing = _predict(
        models, image, "--model", TINY_MODEL, "--output", str(out), "--broker", redis_url, "--spacing", "1,1,1"
    )
    assert with_spacing.returncode == 2 and "--spacing is not supported with --broker" in with_spacing.stderr
    assert not out.exists()


def test_predict_broker_timeout_gives_up_and_deletes_unfinished_jobs(redis_url, postgres_url, tmp_path):  # noqa: F811
    """No worker takes the queue: with ``--timeout`` each series is reported failed once its job
    has waited that long, and its job (row and staged files) is deleted so no worker runs it later."""
    images = shared_path("hippocampus", "imagesTr")
    inputs = [str(images / "hippocampus_001.nii.gz"), str(images / "hippocampus_004.nii.gz")]
    models = build_tiny_model(tmp_path / "models")
    database = _fresh_database(postgres_url, "predict_broker_timeout")
    data = tmp_path / "shared"
    data.mkdir()
    out = tmp_path / "out"
    scale = ["--broker", redis_url, "--database-url", database, "--data-dir", str(data), "--queue", "nobody"]

    bad = _predict(models, *inputs, "--model", TINY_MODEL, "--output", str(out), *scale, "--timeout", "0")
    assert bad.returncode == 2 and "--timeout 0.0: must be a positive number" in bad.stderr, bad.stderr

    started = time.monotonic()
    run = _predict(models, *inputs, "--model", TINY_MODEL, "--output", str(out), *scale, "--timeout", "2")
    waited = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr
    failed = [line for line in run.stderr.splitlines() if line.startswith("failed")]
    assert len(failed) == 2 and all("not finished within --timeout 2 s" in line for line in failed), run.stderr
    assert all("queued" in line for line in failed), run.stderr
    assert "0 segmented, 0 already done, 0 skipped, 2 failed" in run.stdout, run.stdout
    assert waited < 60
    assert not out.exists() or not list(out.iterdir())  # nothing written for the given-up series
    assert list((data / "jobs").iterdir()) == [] and list((data / "incoming").iterdir()) == []
    from service.store import Job, Store

    store = Store(database)
    try:
        with store.session() as session:
            assert session.query(Job).count() == 0
    finally:
        store.dispose()
