"""The suite's time ceiling (tests/fixtures/budget.py): a run past it fails in one line naming the slowest
tests; under it, it passes; each tier's time is printed. Run as a real pytest in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_suite(tmp_path: Path, ceiling: str) -> subprocess.CompletedProcess:
    tests = tmp_path / "tests" / "unit"
    tests.mkdir(parents=True)
    (tests / "test_two.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\ndef test_slow():\n    time.sleep(0.3)\n")
    env = {**os.environ, "DROPE_TEST_CEILING_S": ceiling, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.fixtures.budget", "-p", "no:cacheprovider",
                           str(tests)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_run_past_the_ceiling_fails_naming_the_slowest_test(tmp_path):
    proc = run_suite(tmp_path, "0.2")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if "ceiling (DROPE_TEST_CEILING_S" in ln)
    assert line.index("test_two.py::test_slow") < line.index("test_two.py::test_quick"), line  # slowest first


def test_a_run_under_the_ceiling_passes_and_prints_each_tier(tmp_path):
    proc = run_suite(tmp_path, "600")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "DROPE_TEST_CEILING_S" not in proc.stdout
    tier = next(ln for ln in proc.stdout.splitlines() if ln.startswith("unit "))
    assert "over 2 tests" in tier, tier


def test_a_ceiling_that_is_not_a_number_is_named(tmp_path):
    proc = run_suite(tmp_path, "45min")
    assert proc.returncode != 0
    assert "DROPE_TEST_CEILING_S='45min' is not a number" in proc.stdout + proc.stderr
