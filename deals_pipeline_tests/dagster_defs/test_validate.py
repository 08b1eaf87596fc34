"""The code location loads with Dagster's own tools, and nothing it calls is deprecated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [
    [str(BIN / "dagster"), "definitions", "validate", "-m", "deals_pipeline.definitions"],
    [str(BIN / "dg"), "check", "defs"],
], ids=["dagster_definitions_validate", "dg_check_defs"])
def test_definitions_validate_with_no_deprecation_warning(command, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": str(BIN.parent), "PYTHONWARNINGS": "default"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "deprecat" not in output.lower(), output[-3000:]
