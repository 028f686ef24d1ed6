"""What a benchmark's figures were measured on, one implementation for every script here:
``describe(packages)`` -> CPU model and cores (``/proc/cpuinfo``), the CPUs this process may use,
load average, memory (GiB), Python, the system and the given packages' versions."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path


def describe(packages: Sequence[str] = ("medseg", "torch", "monai", "openvino")) -> dict:
    """The machine and the versions of ``packages`` (``None`` where one is not installed)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    blocks = _cpu_blocks(cpuinfo)
    models = [block["model name"] for block in blocks if "model name" in block]
    cores = {(block.get("physical id"), block["core id"]) for block in blocks if "core id" in block}
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "logical_cpus_in_cpuinfo": len(models) or None,
        "physical_cores_in_cpuinfo": len(cores) or None,
        "os_cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def _cpu_blocks(cpuinfo: str) -> list[dict[str, str]]:
    blocks = []
    for block in cpuinfo.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        blocks.append(fields)
    return blocks


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None
