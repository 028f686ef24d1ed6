"""What a batch of inputs came to, one line each, and the rules its outputs obey: shared by
``medseg predict``'s volume path, its ``--broker`` path and the nuclei tile path
(:mod:`medseg.nuclei.batch`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import ConfigError

__all__ = ["Outcome", "refuse_overwrite", "report_outcomes", "unique_stem"]


@dataclass
class Outcome:
    """One input's (series' or tile's) result: ``status`` ``done``, ``skipped``, ``exists``
    (``--skip-existing`` found its report) or ``failed``, with the reason and the written files."""

    name: str
    status: str
    reason: str = ""
    outputs: dict = field(default_factory=dict)


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, with ``_`` appended until it is not in ``used`` (two inputs of the same name in
    different folders); the result is added to ``used``."""
    while stem in used:
        stem += "_"
    used.add(stem)
    return stem


def refuse_overwrite(outputs, input_files: set[Path], out_dir: Path) -> None:
    """Raise :class:`ConfigError` if one of the ``outputs`` paths is an input file (resolved)."""
    clash = [p for p in outputs if p.resolve() in input_files]
    if clash:
        raise ConfigError(f"--output {out_dir}: {clash[0].name} would overwrite an input; choose another output folder")


def report_outcomes(outcomes: list[Outcome], out_dir: Path) -> int:
    """Print one line per input and the counts, and return the exit code: 0, or 1 when one failed
    or none fitted the model (a line on stderr says so)."""
    for outcome in outcomes:
        if outcome.status == "done":
            print(f"done     {outcome.name} -> {', '.join(Path(p).name for p in outcome.outputs.values())}")
        elif outcome.status == "exists":
            print(f"exists   {outcome.name} ({outcome.reason}.json in {out_dir})")
        else:
            print(f"{outcome.status:<8} {outcome.name}: {outcome.reason}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "exists", "skipped", "failed")}
    print(
        f"{counts['done']} segmented, {counts['exists']} already done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed; outputs in {out_dir}"
    )
    if counts["failed"]:
        return 1
    if counts["done"] + counts["exists"] == 0:
        print("no input fits the model", file=sys.stderr)
        return 1
    return 0
