"""The README works when pasted: every fenced shell block is run as written (bash ``set -e``), except
the few listed in :data:`NOT_RUN` with the reason (an install, the whole test suite, a foreground
server, a 39-minute training on the shared data, or reference listings with placeholders such as
``STUDY_EXPORT_DIR`` or ``$ID``). A new shell block is run unless it is added there.

The blocks run in a temporary folder that holds links to what they read from the repository
(``medseg/``, ``configs/``, ``data_cards/``), so what they write (``out/``, ``medseg-data/``,
``seg.dcm``, ``runs/``...) never lands in the repository. The serve example gets a free port
instead of 8000 (the only change made to a block), really starts ``medseg serve``, segments the
bundled sample with the bundled ``hippocampus`` model and downloads a real DICOM SEG.
The YAML and JSON examples are validated by the code that reads them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

README = REPO / "README.md"
LINKED = ("medseg", "configs", "data_cards")
SHELL = ("", "bash", "sh", "shell")
KNOWN_LANGUAGES = (*SHELL, "text", "yaml", "json")

#: blocks that are not run, by their first line: (kind, reason)
NOT_RUN = {
    'pip install torch==2.13.0 && pip install -e ".[test]" && medseg predict medseg/samples/hippocampus_mr '
    "--model hippocampus --output out/": (
        "install",
        "installs packages; its non-install part (the main job) is the second line of the "
        "Quickstart block, which is run",
    ),
    "python -m pytest -q": ("suite", "runs the whole test suite, this test included"),
    "medseg predict STUDY_EXPORT_DIR/ scans.zip image.nii.gz --model hippocampus --output out/ --tta --skip-existing": (
        "placeholders",
        "not runnable, placeholders: STUDY_EXPORT_DIR, scans.zip, image.nii.gz, DICOM_DIR, UID, PRED_DIR, LABEL_DIR",
    ),
    "medseg train configs/hippocampus/stunet.yaml --fold 0        # also dformer, transunet3d, swin_unetr": (
        "reference",
        "how the leaderboard rows were trained: about 30 minutes each on ../shared/data; the "
        "network test trains every seed network's tiny config",
    ),
    "medseg train configs/hippocampus/unet.yaml --fold 0 --output runs/hippocampus_unet": (
        "reference",
        "how the bundled model was trained: 39 minutes on ../shared/data; the toy block of "
        "'Train on your own data' runs plan -> train -> export -> predict by name",
    ),
    "medseg plan MyDataset --data-card my_liver --output MyDataset/plan.json   # check every case, plan": (
        "placeholders",
        "not runnable, placeholders: MyDataset, my_liver, my_liver.yaml, STUDY_EXPORT_DIR",
    ),
    "medseg keys create --role submit --name radiology --data-dir ./medseg-data   # prints the key once": (
        "reference",
        "runs the server in the foreground until Ctrl-C; the Quickstart's serve block runs the "
        "same two commands (server in the background) and is run",
    ),
    'pip install -e ".[postgres,scale]"      # psycopg, celery[redis]': (
        "placeholders",
        "not runnable, placeholders: db-host, redis-host, /shared/medseg",
    ),
    "medseg predict ../shared/data/nuclei/monuseg_test/images/TCGA-2Z-A9J9-01A-01-TS1.png --model nuclei "
    "--output out-nuclei/": (
        "real data",
        "needs ../shared/data (MoNuSeg is CC BY-NC-SA and not shipped); tests/test_nuclei.py runs the "
        "bundled model through medseg predict on a crop of this tile and scores it",
    ),
    "medseg train configs/nuclei/unet_hover.yaml --fold 0     # the bundled model; also configs/nuclei/cellvta.yaml": (
        "reference",
        "how the nuclei rows were trained: 55 and 35 minutes on ../shared/data; tests/test_nuclei.py "
        "trains a tiny config of the same path",
    ),
    "medseg train configs/hippocampus/unet.yaml --fold all --cross-validate": (
        "reference",
        "trains five folds (about 2.5 hours on this CPU); tests/test_cross_validation.py runs "
        "--fold all, --cross-validate and the ensemble package on a tiny config of real cases",
    ),
    "medseg predict ../shared/data/vessels/vesselnn_2photon/denoised/burgess2014_tgMouse_BM4D_denoised.tif "
    "--model vessels --spacing 1,1,1 --output out-vessels/": (
        "real data",
        "needs ../shared/data (vesselNN is not shipped); tests/test_vessels.py runs the bundled model "
        "through medseg predict on a crop of this stack and scores it",
    ),
    "medseg quantize PACKAGE_DIR --dataset ../shared/data/hippocampus --fold 0   "
    '# int8 (NNCF), needs pip install -e ".[int8]"': (
        "placeholders",
        "not runnable (tests/test_int8_runtime.py and tests/test_fp16_packages.py run both on a copy of the "
        "bundled model), placeholders: PACKAGE_DIR, runs/hippocampus_unet/model, my_unet",
    ),
    'KEY=msk_...; H="Authorization: Bearer $KEY"; S=http://127.0.0.1:8000': (
        "placeholders",
        "not runnable, placeholders: msk_..., $ID, t1.nii.gz, study.zip, series/, body.mime",
    ),
}

#: the runnable blocks that are checked beyond their exit status, by first line
QUICKSTART = "medseg info medseg/samples/hippocampus_mr              # series, shape, spacing, affine, warnings"
SERVE = "KEY=$(medseg keys create --role submit --data-dir ./medseg-data)   # the key is printed once"
TOY = "mkdir -p toy/imagesTr toy/labelsTr"
CHECKED = {QUICKSTART, SERVE, TOY}

#: runnable blocks (by first line) that need earlier ones in the same folder
NEEDS = {TOY: [QUICKSTART]}  # volume.nii.gz and the label map in out/


@dataclass
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence
    section: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0].strip() if self.text.strip() else ""

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section}): {self.first[:60]}"


def readme_blocks() -> list[Block]:
    blocks, section, current = [], "", None
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if current is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif line.startswith("```"):
                current = Block(line[3:].strip(), "", number, section)
        elif line.startswith("```"):
            blocks.append(current)
            current = None
        else:
            current.text += line + "\n"
    assert current is None, f"unclosed fence at README.md:{current.line}"
    return blocks


BLOCKS = readme_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL]
RUN = [b for b in SHELL_BLOCKS if b.first not in NOT_RUN]


def by_first(first: str) -> Block:
    found = [b for b in SHELL_BLOCKS if b.first == first]
    assert len(found) == 1, f"{len(found)} shell blocks start with {first!r}"
    return found[0]


def test_every_block_is_run_or_listed_with_a_reason():
    assert {b.language for b in BLOCKS} <= set(KNOWN_LANGUAGES), sorted({b.language for b in BLOCKS})
    firsts = [b.first for b in SHELL_BLOCKS]
    assert len(firsts) == len(set(firsts)), "two shell blocks start with the same line"
    stale = sorted(set(NOT_RUN) - set(firsts))
    assert not stale, f"NOT_RUN names blocks the README no longer has: {stale}"
    for first, (kind, reason) in NOT_RUN.items():
        text = by_first(first).text
        if kind == "placeholders":
            for word in re.findall(r"[\w./$-]+", reason.split(":", 1)[1]):
                assert word.rstrip(",") in text or word in ("...",), (first, word)
    for first in {*NEEDS, *CHECKED}:
        assert first in [b.first for b in RUN], first
    assert len(RUN) >= 3


def test_the_install_block_runs_the_main_job_of_the_quickstart():
    """The install block is not run; what it runs after installing is run in the Quickstart block."""
    install = next(first for first, (kind, _) in NOT_RUN.items() if kind == "install")
    main_job = install.split(" && ")[-1]
    assert main_job.startswith("medseg predict ")
    assert main_job in by_first(QUICKSTART).text.splitlines()[1]


# ------------------------------------------------------------------------------ running blocks
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _env() -> dict[str, str]:
    """The user's shell: this venv's commands first; none of the tests' service or model settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MEDSEG_SERVICE_") and k not in ("MEDSEG_MODEL_PATH", "PYTHONPATH")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


class Workspace:
    """The folder the blocks run in, and which blocks already ran there."""

    def __init__(self, root: Path):
        self.root = root
        for name in LINKED:
            (root / name).symlink_to(REPO / name, target_is_directory=True)
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def run(
        self, block: Block, substitutions: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess:
        for first in NEEDS.get(block.first, []):
            if first not in self.done:
                self.run(by_first(first))
        script = block.text
        for old, new in (substitutions or {}).items():
            assert old in script, (old, str(block))
            script = script.replace(old, new)
        process = subprocess.Popen(
            ["bash", "-c", "set -e\n" + script],
            cwd=self.root,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"{block} did not finish within {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
        finally:
            # what the block started in the background (the server) has 60 s to stop by itself
            deadline = time.monotonic() + 60
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        assert result.returncode == 0, (
            f"{block} exited with {result.returncode}\nstdout:\n{out[-3000:]}\n"
            f"stderr:\n{err[-5000:]}{self._serve_log()}"
        )
        self.done[block.first] = result
        return result

    def _serve_log(self) -> str:
        log = self.root / "serve.log"
        return f"\nserve.log:\n{log.read_text(errors='replace')[-3000:]}" if log.exists() else ""


OUTPUTS = (
    "out",
    "volume.nii.gz",
    "medseg-data",
    "serve.log",
    "job.json",
    "seg.dcm",
    "toy",
    "toy.yaml",
    "runs",
    "my-models",
    "toy-out",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    before = {name for name in OUTPUTS if (REPO / name).exists()}
    yield Workspace(tmp_path_factory.mktemp("readme"))
    after = {name for name in OUTPUTS if (REPO / name).exists()}
    assert after <= before, f"the README blocks wrote into the repository: {sorted(after - before)}"


def test_quickstart_block(workspace):
    import nibabel as nib

    result = workspace.run(by_first(QUICKSTART))
    out = workspace.root / "out"
    kinds = sorted(p.name.split(".", 1)[1] for p in out.iterdir())
    assert kinds == ["json", "nii.gz", "png", "seg.dcm"], kinds
    assert nib.load(workspace.root / "volume.nii.gz").shape == nib.load(next(out.glob("*.nii.gz"))).shape
    assert "unet" in result.stdout and "swin_unetr" in result.stdout  # medseg models


def test_serve_block_segments_the_sample_over_http(workspace):
    """Really starts ``medseg serve`` (on a free port), uploads the sample, waits, saves the SEG, stops."""
    import pydicom

    block = by_first(SERVE)
    assert block.text.count("8000") == 2  # --port 8000 and S=http://127.0.0.1:8000
    port = _free_port()
    started = time.monotonic()
    result = workspace.run(block, {"--port 8000": f"--port {port}", "127.0.0.1:8000": f"127.0.0.1:{port}"})
    assert re.search(r"^job [0-9a-f]+: succeeded$", result.stdout, re.M), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    seg = pydicom.dcmread(workspace.root / "seg.dcm")
    assert seg.Modality == "SEG"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior hippocampus", "posterior hippocampus"]
    source = pydicom.dcmread(
        next((REPO / "medseg" / "samples" / "hippocampus_mr").glob("*.dcm")), stop_before_pixels=True
    )
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert not _listening(port), "the server still listens after the block's kill"
    log = (workspace.root / "serve.log").read_text()
    assert '"state": "succeeded"' in log
    print(f"serve block: {time.monotonic() - started:.1f} s")


def test_toy_training_block_plans_trains_exports_and_predicts_by_name(workspace):
    from medseg.package import ModelPackage

    result = workspace.run(by_first(TOY), timeout=400)
    root = workspace.root
    plan = json.loads((root / "toy" / "plan.json").read_text())
    assert len(plan["folds"]) == 5 and len(plan["fingerprint"]["cases"]) == 5
    run = root / "runs" / "toy_unet" / "fold_0"
    for name in ("config.yaml", "plan.json", "log.csv", "summary.json", "checkpoints/best.pt", "model"):
        assert (run / name).exists(), name
    package = ModelPackage(root / "my-models" / "toy_hippocampus")
    assert package.card.name == "toy_hippocampus"
    assert [label.name for label in package.card.labels] == ["anterior hippocampus", "posterior hippocampus"]
    assert '"package":' in result.stdout
    kinds = sorted(p.name.split(".", 1)[1] for p in (root / "toy-out").iterdir())
    assert kinds == ["json", "nii.gz", "png", "seg.dcm"], kinds
    report = json.loads(next((root / "toy-out").glob("*.json")).read_text())
    assert "toy_hippocampus" in json.dumps(report)


def test_other_shell_blocks_run(workspace):
    """A shell block added to the README later is run here (in README order) unless listed in NOT_RUN."""
    for block in RUN:
        if block.first not in CHECKED:
            workspace.run(block)


# ------------------------------------------------------------------------------ other examples
def test_yaml_and_json_examples_are_valid():
    from medseg.data_cards import DataCard

    cards = [b for b in BLOCKS if b.language == "yaml"]
    assert cards, "the data card example"
    for block in cards:
        raw = yaml.safe_load(block.text)
        assert "labels" in raw, str(block)
        card = DataCard.model_validate(raw)
        assert card.labels and card.labels[0].type.scheme == "SCT"
    manifests = [b for b in BLOCKS if b.language == "json"]
    assert manifests, "the dataset.json example"
    for block in manifests:
        manifest = json.loads(block.text)
        assert set(manifest) >= {"name", "modality", "labels"}, str(block)
        assert manifest["labels"]["0"] == "background"


def test_quoted_times_name_the_script_and_the_machine():
    text = README.read_text()
    assert "benchmarks/readme_times.py" in text
    assert (REPO / "benchmarks" / "readme_times.py").is_file()
