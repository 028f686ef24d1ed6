"""The CLI's runtime defaults for a shared machine (issue 20): ``OMP_WAIT_POLICY=PASSIVE`` is set
at start-up, before PyTorch loads, unless the user set a value; a user's value is kept. Each check
runs in a fresh interpreter, as the ``medseg`` command would (nothing heavy is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from medseg.cli import RUNTIME_DEFAULTS, configure_runtime

_PROBE = """
import contextlib, io, json, os, sys
from medseg.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["--help"])
print(json.dumps({"code": code, "policy": os.environ.get("OMP_WAIT_POLICY"), "torch": "torch" in sys.modules}))
"""


def _probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ.update(env)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, cwd=REPO, env=environ, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cli_sets_passive_wait_policy_before_torch():
    probe = _probe()
    assert probe["code"] == 0
    assert probe["policy"] == "PASSIVE" == RUNTIME_DEFAULTS["OMP_WAIT_POLICY"]
    assert not probe["torch"]  # set before PyTorch (and its OpenMP runtime) is loaded


@pytest.mark.parametrize("value", ["ACTIVE", "passive", ""])
def test_cli_keeps_user_wait_policy(value):
    assert _probe(OMP_WAIT_POLICY=value)["policy"] == value


def test_configure_runtime_reports_what_it_set():
    environ: dict[str, str] = {}
    assert configure_runtime(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert configure_runtime(environ) == {}
    user = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_runtime(user) == {} and user == {"OMP_WAIT_POLICY": "ACTIVE"}
