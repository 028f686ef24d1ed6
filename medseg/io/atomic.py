"""Atomic output files: write under a temporary name in the target folder, then ``os.replace``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then ``os.replace(tmp_path, path)``; nothing half-written remains.

    The temporary name sits in the target folder (same file system, so the rename is atomic) and
    keeps the target's suffix (``.nii.gz``, ``.dcm``...) so that format-by-extension writers
    (nibabel, SimpleITK) behave. Parent folders are created. If ``write`` raises, the temporary
    file is removed and the exception propagates; an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
