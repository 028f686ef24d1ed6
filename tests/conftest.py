"""Shared fixtures: where the real data lives, and skip-with-reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test (with the reason) if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set MEDSEG_SHARED_DATA)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """Root of the shared real data (../shared/data)."""
    return shared_path()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_and_private_cache(tmp_path_factory):
    """One intra-op thread for every test (the tests' tensors are tiny, and OpenMP threads spinning
    against other processes on a shared 2-core CPU cost far more than they give), and the
    converted-model cache (``$MEDSEG_CACHE``) in the session's temporary folder, never ~/.cache."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_CACHE", str(tmp_path_factory.mktemp("medseg-cache")))
        yield
    torch.set_num_threads(threads)
