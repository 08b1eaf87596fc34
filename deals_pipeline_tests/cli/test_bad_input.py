"""Bad input gets one clear line on stderr, exit code 2 and no traceback, from every command."""

from __future__ import annotations

import pytest

from deals_pipeline_tests.cli._cli import clean_env, run_cli

pytestmark = pytest.mark.slow  # subprocesses of the console script

CASES = [
    # (args, extra env, words the one line must contain)
    (["backfill", "--pages", "a-b"], {}, ["'a-b' is not a page", "0-66"]),
    (["backfill", "--pages", "5-2"], {}, ["runs backwards"]),
    (["backfill", "--partition", "99"], {}, ["page 99 does not exist", "0-66"]),
    (["backfill", "--pages", "0,67"], {}, ["page 67 does not exist"]),
    (["status"], {"KEEPA_DOMAIN": "12"}, ["KEEPA_DOMAIN=12", "1..11"]),
    (["backfill", "--pages", "2-3"], {"KEEPA_DOMAIN": "12"}, ["KEEPA_DOMAIN=12"]),
    (["status"], {"KEEPA_DOMAIN": "us"}, ["KEEPA_DOMAIN must be an integer"]),
    (["status"], {"DEALS_RUN_BUDGET_MINUTES": "soon"}, ["DEALS_RUN_BUDGET_MINUTES must be a number"]),
    (["backfill", "--pages", "0"], {"DEALS_PIPELINE_MODE": "simulator", "DEALS_PIPELINE_TIME_SCALE": "fast"},
     ["DEALS_PIPELINE_TIME_SCALE must be a number"]),
    (["backfill", "--pages", "0"], {"DEALS_PIPELINE_MODE": "simulator", "DEALS_PIPELINE_TIME_SCALE": "-5"},
     ["DEALS_PIPELINE_TIME_SCALE must be a finite number > 0"]),
    (["backfill", "--pages", "0"], {"DEALS_PIPELINE_MODE": "sim"}, ["'auto', 'keepa' or 'simulator'"]),
    # The README's own command, on a fresh checkout with no key: the two options, not DagsterHomeNotSetError.
    (["backfill", "--pages", "2-3"], {}, ["No Keepa API key", "KEEPA_API_KEY", "DEALS_PIPELINE_MODE=simulator"]),
    (["backfill"], {}, ["--pages", "required"]),
    (["status", "--busy-timeout", "x"], {}, ["invalid float value"]),
    (["frobnicate"], {}, ["invalid choice"]),
]


@pytest.mark.parametrize("args,extra,words", CASES, ids=[" ".join(c[0]) + " " + " ".join(c[1]) for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, extra, words):
    env = clean_env(tmp_path, **extra)
    done = run_cli(args, env, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("deals-pipeline: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "deals.duckdb").exists(), "a refused command stores nothing"
