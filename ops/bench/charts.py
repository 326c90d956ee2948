"""PNG charts of one benchmark result (matplotlib, headless Agg backend).

Drawn only from the result JSON, so a chart can be redrawn from a saved result
(``python -m ops.bench --redraw RESULT.json``). Must never measure anything itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or bench machines
import matplotlib.pyplot as plt

MiB = 1024 * 1024


def draw_all(result: dict[str, Any], outdir: Path) -> list[Path]:
    """Every chart the result has data for; returns the files written."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = [ratios(result, outdir / "ratios.png")]
    scenarios = result.get("scenarios", {})
    if any(name in scenarios for name in ("cold", "warm", "storm", "put", "tus")):
        written.append(throughput(scenarios, outdir / "throughput.png"))
    if "seek" in scenarios:
        written.append(seek_latency(scenarios["seek"], outdir / "seek_latency.png"))
    if "put" in scenarios:
        written.append(put_rss(scenarios["put"], outdir / "put_rss.png"))
    if result.get("cpu"):
        written.append(cpu_per_gib(result["cpu"], outdir / "cpu.png"))
    if "amplify" in scenarios:
        written.append(amplification(scenarios["amplify"], outdir / "amplification.png"))
    return written


def cpu_per_gib(cpu: dict[str, Any], path: Path) -> Path:
    """CPU-seconds per GiB moved: the gateway process beside each peer's own process."""
    rows: list[tuple[str, float, str]] = []
    for name, doc in cpu.items():
        rows.append((f"{name}: chunkgate", doc["chunkgate"]["median"], "tab:blue"))
        rows.extend((f"{name}: {peer}", series["median"], "0.6") for peer, series in doc.items() if peer != "chunkgate")
    fig, ax = plt.subplots(figsize=(9, 0.4 * max(len(rows), 1) + 1.5))
    for y, (_label, value, colour) in enumerate(rows):
        ax.barh(y, value, color=colour)
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.5, color="tab:red", linestyle=":", linewidth=1, label="PUT / cold GET goal 1.5")
    ax.axvline(0.25, color="tab:orange", linestyle=":", linewidth=1, label="warm GET goal 0.25")
    ax.set_xlabel("CPU-seconds per GiB (utime+stime from /proc, median of the runs)")
    ax.set_title("CPU per byte: the gateway process and each peer's process")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def amplification(amp: dict[str, Any], path: Path) -> Path:
    """Store bytes per byte served, per read pattern (1.0 = the store sent what was served)."""
    rows = [("sequential GET", amp["sequential"]["ratio"]),
            (f"{amp['cache_pressure']['readers']} readers, working set > cache", amp["cache_pressure"]["ratio"]),
            (f"16-part multi-range, over {amp['multi_range']['repeats']} repeats", amp["multi_range"]["ratio_all"]),
            ("16-part multi-range, first request", amp["multi_range"]["ratio_first"])]
    fig, ax = plt.subplots(figsize=(8, 3))
    for y, (_label, value) in enumerate(rows):
        ax.barh(y, value, color="tab:blue")
        ax.text(value, y, f" {value:g}x", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.05, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xlabel("store bytes / bytes served (log); abandoned GET: "
                  f"{amp['abandoned']['store_bytes_per_get']} store bytes each")
    ax.set_title("read amplification")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratios(result: dict[str, Any], path: Path) -> Path:
    """Each goal's ratio against its goal line: green met, red missed, grey informational."""
    rows = [c for c in result.get("comparisons", [])]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 1) + 1.5))
    for y, row in enumerate(rows):
        informational = row["met"] is None
        colour = "0.6" if informational else ("tab:green" if row["met"] else "tab:red")
        ax.barh(y, row["ratio"], color=colour)
        if not informational:
            ax.plot([row["goal"], row["goal"]], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(row["ratio"], y, f" {row['ratio']:.2f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1)
    ax.set_xlabel("chunkgate / peer (black tick = goal, grey = no goal; latency rows: lower is better)")
    ax.set_title("chunkgate against peers, same run, same SeaweedFS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(scenarios: dict[str, Any]) -> list[tuple[str, list[tuple[str, float, bool]]]]:
    groups: list[tuple[str, list[tuple[str, float, bool]]]] = []
    if "cold" in scenarios:
        s = scenarios["cold"]
        groups.append((f"cold GET {s['size'] // MiB} MiB", [
            ("chunkgate", s["chunkgate_curl"]["median"], True), ("boto3", s["boto3_download_fileobj"]["median"], False),
            ("curl direct", s["curl_from_store"]["median"], False)]))
    if "warm" in scenarios:
        s = scenarios["warm"]
        groups.append((f"warm GET {s['size'] // MiB} MiB", [
            ("chunkgate", s["chunkgate_cache_hit"]["median"], True), ("bare aiohttp", s["bare_aiohttp"]["median"], False)]))
    if "storm" in scenarios:
        s = scenarios["storm"]
        groups.append((f"storm {s['readers']}x{s['size'] // MiB} MiB", [
            ("chunkgate cold", s["chunkgate_cold"]["median"], True), ("nginx cold", s["nginx_cold"]["median"], False),
            ("chunkgate warm", s["chunkgate_warm"]["median"], True), ("nginx warm", s["nginx_warm"]["median"], False),
            ("direct", s["direct"]["median"], False)]))
    if "put" in scenarios:
        for label, s in scenarios["put"]["sizes"].items():
            groups.append((f"PUT {label}", [("chunkgate", s["chunkgate_put"]["median"], True),
                                            ("boto3", s["boto3_upload_fileobj"]["median"], False)]))
    if "tus" in scenarios:
        s = scenarios["tus"]
        groups.append((f"tus {s['size'] // MiB} MiB", [
            ("chunkgate", s["chunkgate_tus"]["median"], True), ("@tus/server", s["tus_node"]["median"], False),
            ("boto3", s["boto3_upload_fileobj"]["median"], False)]))
    return groups


def throughput(scenarios: dict[str, Any], path: Path) -> Path:
    """Median MiB/s per scenario, chunkgate (blue) beside its peers (grey)."""
    groups = _bars(scenarios)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups), 4), squeeze=False)
    for ax, (title, bars) in zip(axes[0], groups):
        ax.bar(range(len(bars)), [b[1] for b in bars], color=["tab:blue" if b[2] else "0.6" for b in bars])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("MiB/s (median)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seek_latency(seek: dict[str, Any], path: Path) -> Path:
    """Latency CDF of cold 64 KiB ranged reads: chunkgate vs straight from the store."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label, colour in (("chunkgate", "chunkgate cold", "tab:blue"), ("chunkgate_same_chunk_repeat", "chunkgate, 2nd seek in the chunk", "tab:cyan"),
                                ("direct", "direct from store (one large object)", "0.5"),
                                ("direct_from_chunk_object", "direct from the same 8 MiB chunk object", "0.75"),
                                ("direct_in_first_chunk", "direct, same offset in the large object's first 8 MiB", "tab:orange")):
        values = sorted(seek["samples_ms"].get(name, []))
        if values:
            ax.plot(values, [(n + 1) / len(values) for n in range(len(values))], label=label, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("ms per 64 KiB ranged GET (random offset)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("seek probe latency")
    ax.set_xlim(left=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def put_rss(put: dict[str, Any], path: Path) -> Path:
    """The gateway's RSS above its pre-upload baseline during each PUT, against the limit."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in put["sizes"].items():
        for n, series in enumerate(s["rss_series"]):
            ax.plot([t for t, _ in series], [v / MiB for _, v in series], label=f"{label} run {n + 1}", linewidth=1)
    ax.axhline(put["rss_limit_bytes"] / MiB, color="tab:red", linestyle="--", label="limit (N+2) x chunk + 64 MiB")
    ax.set_xlabel("seconds into the upload")
    ax.set_ylabel("RSS growth, MiB")
    ax.set_title("gateway memory during PUT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
