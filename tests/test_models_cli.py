"""``medseg models``: walks the registry, exact reference configs, meta-device parameter counts."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from medseg.cli import main
from medseg.commands.models import count_reference_parameters
from medseg.networks import list_networks, network_entry


@pytest.fixture(scope="module")
def listed():
    """``medseg models --json`` run once, in-process: (exit code, rows, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["models", "--json"])
    return code, json.loads(out.getvalue()), err.getvalue()


def test_lists_every_registered_network_and_reference(listed):
    _, rows, _ = listed
    expected = {(n, label) for n in list_networks() for label in network_entry(n).references}
    assert {(r["name"], r["reference"]) for r in rows} == expected
    for row in rows:
        assert row["config"] == json.loads(json.dumps(network_entry(row["name"]).references[row["reference"]]))


def test_counts_are_meta_device_counts_of_create_network(listed):
    _, rows, _ = listed
    by_key = {(r["name"], r["reference"]): r for r in rows}
    assert by_key["transunet", "R50-ViT-B_16"]["parameters"] == 105_277_081
    assert by_key["swin_unetr", "BTCV"]["parameters"] == 62_187_296
    for (name, label), row in by_key.items():
        if row["parameters"] is not None:
            assert row["parameters"] == count_reference_parameters(name, network_entry(name).references[label])


def test_every_network_builds_so_the_command_succeeds(listed):
    code, rows, err = listed
    failed = [f"{r['name']}/{r['reference']}: {r['error']}" for r in rows if r["parameters"] is None]
    assert not failed, "networks that do not build on the meta device:\n" + "\n".join(failed)
    assert code == 0 and err == ""


def test_table_and_filter(capsys):
    code = main(["models", "transunet", "swin_unetr"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["network", "reference", "parameters", "config"]
    assert any(line.split()[:3] == ["transunet", "R50-ViT-B_16", "105,277,081"] for line in out)
    assert any(line.split()[:3] == ["swin_unetr", "BTCV", "62,187,296"] for line in out)
    assert {line.split()[0] for line in out[1:]} == {"transunet", "swin_unetr"}


def test_unknown_network_is_one_line_error_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "medseg", "models", "no_such_net"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no_such_net" in result.stderr and "Traceback" not in result.stderr
