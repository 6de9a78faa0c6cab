"""The benchmark runs end to end at its quick sizes, so it cannot rot.

Runs `python bench/run.py --quick --only ours,bare` as a subprocess (the FastAPI
peer's column adds a minute and proves nothing of ours): it must exit 0 (it exits 1
when one of our checks fails: lost, repeated or dropped messages, or a scenario
errors) and print the table with a number in our column and in the bare limit's
for every scenario row, and the ratio between them.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One or more table rows per scenario; each must carry a number for ours.
ROWS = (
    "1a throughput, ", "1a throughput: acked", "1a throughput: ack p50",
    "1a throughput: ack p99", "1a throughput: send->delivery p99",
    "1b max sustained", "1c overload", "1 throughput check",
    "2 idle sockets (", "2 idle sockets check",
    "3 spread to ", "3 spread: send->last receipt p99", "3 spread check",
    "4 room list (", "4 room list: p99", "4 open room with after (",
    "4 open room with after: connect->history p99",
    "5 reconnect storm (", "5 reconnect storm check",
    "6 startup to healthz, empty database", "6 startup to healthz, ",
    "6 RSS at rest after startup",
)
CHECKS = ("1 throughput check", "2 idle sockets check", "3 spread check",
          "5 reconnect storm check")


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ")]
    assert rows, f"no table in the output:\n{stdout}"
    return rows[0], rows[1:]


@pytest.mark.timeout(150)
def test_quick_bench_prints_every_scenario():
    done = subprocess.run([sys.executable, "bench/run.py", "--quick", "--only", "ours,bare"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    header, rows = table(done.stdout)
    assert header[:5] == ["metric", "unit", "ours", "bare", "ours/bare"], header
    for prefix in ROWS:
        matching = [row for row in rows if row[0].startswith(prefix)]
        assert matching, f"no row {prefix!r} in:\n{done.stdout}"
        for row in matching:
            value = float(row[2])  # "n/a" (a failed scenario) does not parse
            assert not math.isnan(value) or "nan: not drained" in row[0], row
            float(row[3])  # the bare limit's figure, in the same run
            if row[0].startswith(CHECKS):
                assert value == 0, row
