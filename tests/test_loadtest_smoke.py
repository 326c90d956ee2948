"""The load test runs as CI would use it: a short, small run must finish by itself with 0 errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_short_load_test_finishes_by_itself_without_errors() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "ops" / "bench" / "loadtest.py"), "--connections", "8", "--duration", "5",
         "--objects", "4", "--object-size", "300000", "--write-size", "200000", "--chunk-size", "64KiB"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["errors"] == 0
    for kind in ("read", "range", "write"):
        assert result[kind]["ops"] > 0 and result[kind]["errors"] == 0
        assert result[kind]["p50_ms"] > 0  # latencies were measured, not left at zero
    assert result["rss_start_mib"] > 0 and result["rss_end_mib"] > 0
    assert "p50 ms" in out.stdout and "p99 ms" in out.stdout
