"""``python -m ops.bench.report FINAL.json [SECOND.json]``: the README's benchmark tables, in
Markdown, from one full run and (beside it) a second run of the same commit.

Reads results only; must never measure. A goal counts as met only where both runs met it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _fmt(value: float, unit: str) -> str:
    if unit == "MiB/s":
        return f"{value:.0f} MiB/s"
    if "ms" in unit:
        return f"{value:.1f} ms"
    return f"{value:.3g}"


def _met(*flags: bool | None) -> str:
    known = [f for f in flags if f is not None]
    if not known:
        return "–"
    return "yes" if all(known) else ("**no**" if not any(known) else "one run")


def comparisons(final: dict[str, Any], second: dict[str, Any] | None) -> list[str]:
    other = {c["name"]: c for c in (second or {}).get("comparisons", [])}
    rows = ["| comparison (peer) | chunkgate | peer | ratio | second run | goal | met |", "|---|---|---|---|---|---|---|"]
    for c in final.get("comparisons", []):
        o = other.get(c["name"])
        again = f"{o['ratio']:.2f}x" if o else "–"
        rows.append(f"| {c['name']} ({c['peer_name']}) | {_fmt(c['chunkgate'], c['metric'])} | {_fmt(c['peer'], c['metric'])} "
                    f"| {c['ratio']:.2f}x | {again} | {c['goal_text'] or '–'} | {_met(c['met'], o['met'] if o else None)} |")
    return rows


def cpu(final: dict[str, Any], second: dict[str, Any] | None) -> list[str]:
    other = (second or {}).get("cpu", {})
    limits = {t["name"].removesuffix(" gateway CPU"): t for t in final.get("targets", []) if t["name"].endswith(" gateway CPU")}
    other_limits = {t["name"].removesuffix(" gateway CPU"): t for t in (second or {}).get("targets", [])
                    if t["name"].endswith(" gateway CPU")}
    rows = ["| transfer | chunkgate CPU-s/GiB | second run | peer process CPU-s/GiB (second run) | goal | met |",
            "|---|---|---|---|---|---|"]
    for name, doc in final.get("cpu", {}).items():
        o = other.get(name, {})
        peers = "; ".join(f"{peer} {series['median']:.2f}" + (f" ({o[peer]['median']:.2f})" if peer in o else "")
                          for peer, series in doc.items() if peer != "chunkgate") or "–"
        limit, other_limit = limits.get(name), other_limits.get(name)
        again = f"{o['chunkgate']['median']:.2f}" if o else "–"
        goal = limit["goal_text"] if limit else "–"
        met = _met(limit["met"] if limit else None, other_limit["met"] if other_limit else None)
        rows.append(f"| {name} | {doc['chunkgate']['median']:.2f} | {again} | {peers} | {goal} | {met} |")
    floors = [_floor(r) for r in (final, second) if r is not None and _floor(r)]
    if floors:
        rows += ["", "SHA-256 on the machine during each run (CPU-s/GiB, start–end; every figure above moves "
                 "with it): " + "; ".join(floors) + "."]
    return rows


def _floor(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    if "sha256_cpu_s_per_gib_start" not in machine:
        return ""
    return f"{machine['sha256_cpu_s_per_gib_start']:.2f}–{machine.get('sha256_cpu_s_per_gib_end', float('nan')):.2f}"


def targets(final: dict[str, Any], second: dict[str, Any] | None) -> list[str]:
    other = {t["name"]: t for t in (second or {}).get("targets", [])}
    rows = ["| figure | value | second run | goal | met |", "|---|---|---|---|---|"]
    for t in final.get("targets", []):
        if t["name"].endswith(" gateway CPU"):
            continue
        o = other.get(t["name"])
        again = f"{o['value']:.4g}" if o else "–"
        rows.append(f"| {t['name']} ({t['metric']}) | {t['value']:.4g} | {again} | {t['goal_text']} "
                    f"| {_met(t['met'], o['met'] if o else None)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    final = json.loads(Path(args[0]).read_text())
    second = json.loads(Path(args[1]).read_text()) if len(args) > 1 else None
    for block in (comparisons(final, second), cpu(final, second), targets(final, second)):
        print("\n".join(block))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
