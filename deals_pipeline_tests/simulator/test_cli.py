"""The simulator CLI in a real subprocess: ready-file, shared clock, /token, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from deals_pipeline.clock import TIME_SCALE_ENV, ScaledClock, clock_from_env
from deals_pipeline.simulator.cli import main


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"simulator exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("ready-file never appeared")


@pytest.mark.slow  # a real subprocess
def test_cli_subprocess_ready_file_token_and_sigterm(tmp_path, sentinel_key):
    ready = tmp_path / "sim" / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "deals_pipeline.simulator.cli", "--port", "0", "--time-scale", "60",
            "--refill-rate", "5", "--initial-tokens", "42", "--catalog-size", "150", "--ready-file", str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
    )  # fmt: skip
    try:
        info = _wait_for(ready, proc)
        assert info["pid"] == proc.pid and info["time_scale"] == 60.0
        assert info["base_url"].startswith("http://127.0.0.1:")
        # The env lets another process rebuild the same scaled clock.
        clock = clock_from_env(info["env"])
        assert isinstance(clock, ScaledClock) and clock.anchor_wall_s == info["time_anchor"]
        r = requests.get(f"{info['base_url']}/token", params={"key": sentinel_key}, timeout=5)
        assert r.status_code == 200
        body = r.json()
        assert body["tokensConsumed"] == 0 and body["refillRate"] == 5 and 42 <= body["tokensLeft"] <= 300
        assert abs(body["timestamp"] - clock.now_ms()) < 60 * 2_000  # same timeline, within 2 s of wall skew
        r = requests.get(
            f"{info['base_url']}/deal",
            params={"key": sentinel_key, "selection": json.dumps({"page": 0, "domainId": 1, "priceTypes": [2],
                                                                  "sortType": 1, "dateRange": 0})},
            timeout=5,
        )  # fmt: skip
        assert r.status_code == 200 and len(r.json()["deals"]["dr"]) == 150
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.count("\n") == 1 and info["base_url"] in out
        assert sentinel_key not in out + err
        assert not ready.exists()  # removed on a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_main_rejects_bad_options():
    assert main(["--p-server-error", "2", "--catalog-size", "1"]) == 2
    assert main(["--expected-key-env", "DEALS_PIPELINE_TEST_UNSET_VAR_XYZ", "--catalog-size", "1"]) == 2


def test_cli_scale_one_writes_system_clock_env(tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deals_pipeline.simulator", "--time-scale", "1", "--catalog-size", "5",
         "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        info = _wait_for(ready, proc)
        assert info["env"] == {TIME_SCALE_ENV: "1.0"}
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
