"""``medseg predict INPUT... --model NAME_OR_PATH --output DIR``: segment every fitting series.

Inputs are image files (NIfTI, NRRD, MetaImage, DICOM), folders of scanner exports (searched
recursively; DICOM grouped by SeriesInstanceUID) or ZIP archives. Each series found is checked
against the model (:mod:`medseg.inference.matching`: modality, channels, training field of view);
non-fitting series are skipped with the reason. The model is loaded once; the next series is
read in a background thread while the current one is segmented. Per series the outputs of
:func:`medseg.outputs.write_outputs` are written (NIfTI label map, DICOM SEG for DICOM input, JSON
report, preview PNG). A failing series is reported and the batch goes on.

Outputs never overwrite an input (such a run is refused), files under the output folder are
never taken as input (so ``--output`` may sit inside an input folder and the run be repeated),
and a run that writes nothing leaves no empty output folder behind.

With ``--broker URL`` the series are not segmented here: each becomes a job of the service's job
store (the same upload checks, :class:`service.broker.BatchClient`), published to the Celery queue
that ``medseg worker`` processes take jobs from; the command waits, showing a progress bar over
series, and copies each job's results into ``--output`` under the names, and with the exit codes,
of a local run. ``--data-dir`` must be the workers' data dir on a shared file system: inputs are
staged into it and results read back from it. Without ``--broker`` nothing of this is used.

A nuclei model (card ``task: nuclei``) segments 2D tiles instead: :mod:`medseg.nuclei.batch`.

Exit code: 0 when every fitting series was segmented (or already was, with ``--skip-existing``);
1 when any series or input failed, or when no series fitted the model; 2 for bad arguments or an
unknown model (handled by :mod:`medseg.cli`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ConfigError, MedsegError
from medseg.outcomes import Outcome, refuse_overwrite, report_outcomes, unique_stem

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images, scanner exports and archives with a model package",
        description="Segment every series of the inputs that fits the model; write a NIfTI label "
        "map, a DICOM SEG (DICOM input), a JSON report and a preview PNG per series.",
        epilog="exit status: 0 every fitting series segmented; 1 a series or input failed, or no "
        "series fitted the model (per-series errors on stderr); 2 bad arguments, unknown "
        "model, or an output that would overwrite an input",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image file, folder of scanner exports (recursive) or ZIP archive"
    )
    parser.add_argument("--model", "-m", required=True, help="model package name or path")
    parser.add_argument("--output", "-o", required=True, help="output folder")
    parser.add_argument(
        "--formats",
        default=None,
        help="comma-separated outputs among nifti,tiff,seg,rtstruct,json,png,mip "
        "(default: the model card's formats, else nifti,seg,json,png; seg and rtstruct only for DICOM "
        "input; mip: image and label-map maximum intensity projections); nuclei models: among "
        "tiff,geojson,png,json (default: all four)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="nuclei models: microns per pixel of the tiles (default: the TIFF/PNG resolution, else the model's)",
    )
    parser.add_argument(
        "--spacing",
        help="voxel size of TIFF stacks along X,Y,Z in mm (or e.g. 0.99,0.99,5um); overrides the "
        "file's ImageJ/OME metadata and is required when the file has none",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument(
        "--tta",
        action="store_const",
        const=True,
        default=None,
        help="mirroring test-time augmentation (default: the model card's; on for cross-validation ensembles)",
    )
    tta.add_argument(
        "--no-tta", dest="tta", action="store_const", const=False, help="no test-time augmentation, even for ensembles"
    )
    parser.add_argument(
        "--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: the model card's)"
    )
    parser.add_argument(
        "--skip-existing", action="store_true", help="skip series whose report is already in the output folder (resume)"
    )
    parser.add_argument(
        "--runtime",
        default="auto",
        help="auto, openvino, openvino_int8 (a package quantised by medseg quantize), eager, channels_last or "
        "compile; auto is openvino on the CPU (openvino_int8 where the model card enables it)",
    )
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call (default: automatic)")
    scale = parser.add_argument_group(
        "scale-out (the workers of `medseg worker`)",
        "With --broker the series are segmented by `medseg worker` processes, not here: each is "
        "submitted as a job to their queue and job store, and its results are copied into --output "
        "once done (same file names, --skip-existing and exit codes as a local run). --data-dir must "
        "be the workers' data dir on a shared file system (inputs are staged into it, results read "
        "back from it); --device, --runtime and --sw-batch-size are then the workers' own; --model "
        "is a registered name they know. Only --broker turns this on; the others may also come from "
        "MEDSEG_SERVICE_DATABASE_URL, MEDSEG_SERVICE_DATA_DIR and MEDSEG_SERVICE_BROKER_QUEUE.",
    )
    scale.add_argument(
        "--broker",
        metavar="URL",
        help="Celery broker of the workers, e.g. redis://host:6379/0 or amqp://user:pass@host//",
    )
    scale.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL of the workers' job store")
    scale.add_argument("--data-dir", metavar="DIR", help="the workers' data dir, on a shared file system")
    scale.add_argument("--queue", metavar="NAME", help="Celery queue name (default medseg)")
    scale.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up a series whose job has not finished this many seconds after it was submitted "
        "(queued or running): it is reported failed and its job deleted (default: wait)",
    )
    parser.set_defaults(func=run)


def _formats(text: str) -> tuple[str, ...]:
    from medseg.outputs import FORMATS

    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats: unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(FORMATS)})")
    return formats


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    from medseg.io.tiff import parse_spacing

    try:
        return parse_spacing(text)
    except ValueError as error:
        raise ConfigError(f"--spacing: {error}") from None


def _device(text: str) -> str:
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no CUDA device is available")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
        return text
    raise ConfigError(f"--device {text}: use cpu, cuda or cuda:N")


def _label(info) -> str:
    """How a series is named on the console: description and UID (no patient data)."""
    description = info.description or "series"
    return f"{description} ({info.uid})" if info.format == "dicom" else description


def run(args: argparse.Namespace) -> int:
    from medseg.package import resolve_model

    device = _device(args.device)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap {args.overlap}: must be in [0, 1)")
    from medseg.inference.runtime import RUNTIMES

    if args.runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {args.runtime}: choose from {', '.join(RUNTIMES)}")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output {out_dir.name}: exists and is not a folder")
    package = resolve_model(args.model)
    if package.card.task == "nuclei":
        from medseg.nuclei.batch import run_nuclei

        return run_nuclei(args, package, device, out_dir)
    from medseg.outputs import DEFAULT_FORMATS

    formats = _formats(args.formats) if args.formats else tuple(package.card.formats or DEFAULT_FORMATS)
    resolved_out = out_dir.resolve()
    batch = _batch(args) if getattr(args, "broker", None) else None
    try:
        return _scan_and_run(args, package, formats, device, out_dir, resolved_out, batch)
    finally:
        if batch is not None:
            batch.client.close()


def _scan_and_run(args, package, formats, device, out_dir, resolved_out, batch) -> int:
    from medseg.inference.matching import modality_mismatch
    from medseg.io import find_series
    from medseg.outputs import output_paths, stem_for

    card = package.card

    outcomes: list[Outcome] = []
    candidates = []
    input_files: set[Path] = set()
    spacing = _spacing(getattr(args, "spacing", None))
    for path in args.inputs:
        try:
            found = find_series(path, spacing=spacing)
        except MedsegError as error:
            outcomes.append(Outcome(Path(path).name, "failed", str(error)))
            continue
        scanned = Path(path).resolve()
        inside = scanned.is_dir() and scanned in resolved_out.parents
        for info in found:
            files = [Path(f).resolve() for f in info.files]
            if inside and files and all(resolved_out in f.parents for f in files):
                continue  # an earlier run's outputs in a folder inside the input folder
            input_files.update(files)
            reason = modality_mismatch(info.modality, card)
            if reason:
                outcomes.append(Outcome(_label(info), "skipped", reason))
            else:
                candidates.append(info)

    todo = []
    used: set[str] = set()
    for info in candidates:
        meta = {
            "series_uid": info.uid,
            "series_number": info.series_number,
            "series_description": info.description,
            "source": info.source,
        }
        stem = unique_stem(stem_for(meta, dicom=info.format == "dicom"), used)
        refuse_overwrite(output_paths(out_dir, stem, formats).values(), input_files, out_dir)
        if args.skip_existing and output_paths(out_dir, stem, ["json"])["json"].is_file():
            outcomes.append(Outcome(_label(info), "exists", stem))
            continue
        todo.append((info, stem))

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if batch is not None:
            return _run_broker(batch, todo, outcomes, package, formats, out_dir)
        return _run(args, todo, outcomes, package, device, formats, out_dir)
    finally:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing written: leave no empty folder


def _run(args, todo, outcomes, package, device, formats, out_dir) -> int:
    from tqdm import tqdm

    from medseg.inference import Predictor
    from medseg.inference.matching import image_mismatch
    from medseg.outputs import write_outputs

    card = package.card

    predictor = (
        Predictor(
            package,
            device=device,
            tta=args.tta,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            runtime=args.runtime,
        )
        if todo
        else None
    )
    voxels, compute = 0, 0.0
    writing: tuple[str, Future] | None = None  # the previous series' outputs, written meanwhile

    def write(name: str, prediction, image, stem: str) -> Outcome:
        paths = write_outputs(prediction, image, card, out_dir, formats, stem=stem)
        return Outcome(name, "done", outputs={k: str(v) for k, v in paths.items()})

    def settle() -> None:
        """The outcome of the series being written, once written (outcomes stay in input order)."""
        nonlocal writing
        if writing is not None:
            name, future = writing
            writing = None
            _record(outcomes, name, future.result)

    # the next series is read and the last one written while the network runs on this one
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-write") as writer,
        tqdm(total=len(todo), unit="series", file=sys.stderr, disable=None) as bar,
    ):
        pending: Future | None = reader.submit(todo[0][0].read) if todo else None
        for index, (info, stem) in enumerate(todo):
            current, pending = pending, (reader.submit(todo[index + 1][0].read) if index + 1 < len(todo) else None)
            name = _label(info)

            def segment(current=current, name=name):
                image = current.result()
                reason = image_mismatch(image, card)
                if reason:
                    return Outcome(name, "skipped", reason), None
                return None, (image, predictor.predict(image))

            started = time.perf_counter()
            result = _record(None, name, segment)
            settle()
            if isinstance(result, Outcome):  # failed
                outcomes.append(result)
            elif result[0] is not None:  # skipped
                outcomes.append(result[0])
            else:
                image, prediction = result[1]
                writing = (name, writer.submit(write, name, prediction, image, stem))
                compute += time.perf_counter() - started
                voxels += int(image.array.size)
            del current, result
            bar.update(1)
            if compute:
                bar.set_postfix_str(f"{voxels / compute / 1e6:.2f} Mvoxel/s")
        settle()

    return report_outcomes(outcomes, out_dir)


def _record(outcomes: list[Outcome] | None, name: str, step):
    """``step()``'s result; a failure becomes a ``failed`` Outcome (one bad series never stops the
    batch), appended to ``outcomes`` when given, else returned. A result that is an Outcome is
    appended too."""
    try:
        result = step()
    except MedsegError as error:
        result = Outcome(name, "failed", str(error))
    except Exception as error:
        log.debug("series %s failed", name, exc_info=True)
        result = Outcome(name, "failed", f"{type(error).__name__}: {error}")
    if outcomes is not None and isinstance(result, Outcome):
        outcomes.append(result)
    return result


# --- --broker: the series run as jobs of `medseg worker` processes -------------------------------
POLL_S = 0.5  # seconds between looks at the job store while waiting


@dataclass
class _Batch:
    """A :class:`service.broker.BatchClient` with the job options of this run."""

    client: object
    options: object  # service.inputs.JobOptions (model name, tta, overlap); formats set per series
    model: str
    queue: str
    timeout_s: float | None = None  # per job, from its submission


def _batch(args: argparse.Namespace) -> _Batch:
    """Check the --broker settings, open the job store and reach the broker, before any series
    is looked at.

    Raises:
        ConfigError: ``--spacing`` (not sent to workers), no shared data dir given, a model given by
            path (the workers resolve models by registered name), options the service refuses, or
            broker / job store unreachable.
    """
    import os

    from pydantic import ValidationError

    from medseg.package import resolve_model
    from service.config import ENV_PREFIX, Settings

    if getattr(args, "spacing", None):
        raise ConfigError(
            "--spacing is not supported with --broker (the workers read the voxel size from each file); "
            "run TIFF stacks without one locally"
        )
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout {timeout}: must be a positive number of seconds")
    if not (args.data_dir or os.environ.get(ENV_PREFIX + "DATA_DIR")):
        raise ConfigError("--broker needs --data-dir DIR: the workers' data dir, on a shared file system")
    try:
        package = resolve_model(args.model, allow_path=False)
    except MedsegError:
        raise ConfigError(
            f"--broker: --model must be a registered model name the workers know too, not a path ({args.model})"
        ) from None
    settings = Settings.load(
        {
            "broker_url": args.broker,
            "database_url": args.database_url,
            "data_dir": args.data_dir,
            "broker_queue": args.queue,
        }
    )
    from service.inputs import JobOptions

    try:
        tta = package.card.tta_default if args.tta is None else args.tta  # the card's default unless told
        options = JobOptions(model=args.model, tta=tta, overlap=args.overlap)
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"--{first['loc'][0]}: {first['msg']} (with --broker)") from None
    from service.broker import BatchClient

    try:
        client = BatchClient(settings)
    except Exception as error:  # SQLAlchemy / OS errors opening the store
        raise ConfigError(f"--broker: cannot open the job store: {type(error).__name__}: {error}") from None
    try:
        client.check_reachable(timeout=5.0)
    except Exception as error:  # kombu OperationalError, OSError
        client.close(timeout=0)
        raise ConfigError(f"--broker: broker unreachable ({type(error).__name__}: {error})") from None
    return _Batch(client, options, args.model, settings.broker_queue, timeout)


def _run_broker(batch: _Batch, todo, outcomes, package, formats, out_dir) -> int:
    """Submit ``todo`` as jobs, wait for them, gather their results; returns the exit code.

    A series refused by the upload checks is ``skipped`` (it does not fit the model) or
    ``failed``; a failed job reports its problem detail on stderr and the batch goes on; so does a
    job not finished ``batch.timeout_s`` seconds after its submission (deleted, so that no worker
    segments it later). Jobs are
    deleted (row and files in the shared data dir) once gathered; on an interruption (Ctrl-C)
    those not yet gathered are deleted too, so that no worker segments them for nobody.
    """
    from tqdm import tqdm

    from medseg.errors import ModalityMismatchError, SeriesMismatchError
    from medseg.outputs import output_paths
    from service.inputs import DICOM_ONLY
    from service.pipeline import RESULT_FORMATS
    from service.store import EXPIRED, FAILED, SUCCEEDED

    client, card = batch.client, package.card
    names = [name for name, fmt in RESULT_FORMATS.items() if fmt in formats]
    pending: dict[str, tuple[str, str, float]] = {}  # job id -> (series label, stem, submitted at)
    last_poll = [0.0]
    submitted = 0

    def failed(name: str, reason: str) -> None:
        outcomes.append(Outcome(name, "failed", reason))
        tqdm.write(f"failed   {name}: {reason}", file=sys.stderr)

    def poll(bar) -> None:
        last_poll[0] = time.monotonic()
        jobs = client.jobs(pending)
        now = time.monotonic()
        for job_id, (name, stem, since) in list(pending.items()):
            job = jobs.get(job_id)
            if job is None:
                failed(name, "the job was deleted before it finished")
            elif job.state == SUCCEEDED:
                targets = {n: output_paths(out_dir, stem, [RESULT_FORMATS[n]])[RESULT_FORMATS[n]] for n in names}
                try:
                    written = client.collect(job, targets)
                except OSError as error:
                    failed(name, f"results not gathered: {error}")
                else:
                    outcomes.append(Outcome(name, "done", outputs={k: str(v) for k, v in written.items()}))
                    client.delete(job_id)
            elif job.state in (FAILED, EXPIRED):
                detail = (job.error or {}).get("detail") or f"job {job.state}"
                failed(name, f"{detail} (job {job_id})")
                client.delete(job_id)
            elif batch.timeout_s is not None and now - since > batch.timeout_s:
                failed(name, f"not finished within --timeout {batch.timeout_s:g} s (job {job_id}, {job.state})")
                client.delete(job_id)
            else:
                continue
            del pending[job_id]
            bar.update(1)
        waiting = [job.state for job_id, job in jobs.items() if job_id in pending]
        bar.set_postfix_str(f"{waiting.count('queued')} queued, {waiting.count('running')} running")

    try:
        with tqdm(total=len(todo), unit="series", file=sys.stderr, disable=None) as bar:
            for info, stem in todo:
                name = _label(info)
                dicom = info.format == "dicom"
                wanted = [n for n in names if dicom or n not in DICOM_ONLY]
                try:
                    job = client.submit(
                        info.files, card, batch.model, batch.options.model_copy(update={"formats": wanted or None})
                    )
                    pending[job.id] = (name, stem, time.monotonic())
                    submitted += 1
                except (ModalityMismatchError, SeriesMismatchError) as error:  # as a local run: skipped
                    outcomes.append(Outcome(name, "skipped", str(error).split(": ", 1)[-1]))
                    bar.update(1)
                except MedsegError as error:
                    failed(name, str(error))
                    bar.update(1)
                except OSError as error:
                    failed(name, f"not submitted: {error}")
                    bar.update(1)
                if pending and time.monotonic() - last_poll[0] >= POLL_S:
                    poll(bar)
            tqdm.write(
                f"{submitted} series submitted to queue {batch.queue}; waiting for {len(pending)}",
                file=sys.stderr,
            )
            while pending:
                time.sleep(POLL_S)
                poll(bar)
    finally:
        for job_id in list(pending):  # interrupted: nobody will gather these
            try:
                client.delete(job_id)
            except Exception:
                log.debug("could not delete job %s", job_id, exc_info=True)
    return report_outcomes(outcomes, out_dir)
