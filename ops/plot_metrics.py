"""Plot a chunkgate gateway's key series from a Prometheus into one PNG.

What this script is for: a picture of what the Grafana dashboard shows (request rate by status,
p99 latency by route, store bytes, cache hit ratio, locks, upload throughput) for a README, a bug
report or a benchmark write-up, without running Grafana. It reads Prometheus' HTTP API
(``/api/v1/query_range``) for the last ``--minutes`` and writes the figure with matplotlib:

    python ops/plot_metrics.py --prometheus http://127.0.0.1:9090 --minutes 5 -o ops/metrics.png

What it must never do: write anything to Prometheus or to the gateway (it only issues GET queries),
or need a display (it uses matplotlib's Agg backend). Only the standard library and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # y-axis label
    # (legend template, PromQL). `{w}` is the rate window, `{sel}` the instance selector; a legend
    # template names labels of the result in braces, e.g. "{status}".
    queries: tuple[tuple[str, str], ...]
    scale: float = 1.0  # values are divided by this (bytes -> MiB)
    ratio: bool = False  # a 0..1 axis, so a dip reads as small as it is


PANELS: tuple[Panel, ...] = (
    Panel("HTTP requests/s by status", "requests/s", (
        ("{status}", 'sum by (status) (rate(chunkgate_http_requests_total{sel}[{w}]))'),
    )),
    Panel("HTTP latency p99 by route", "seconds", (
        ("{route}", 'histogram_quantile(0.99, sum by (le, route) (rate(chunkgate_http_request_duration_seconds_bucket{sel}[{w}])))'),
    )),
    Panel("Store bytes/s", "MiB/s", (
        ("read", 'sum(rate(chunkgate_backend_bytes_read_total{sel}[{w}]))'),
        ("written", 'sum(rate(chunkgate_backend_bytes_written_total{sel}[{w}]))'),
    ), scale=2**20),
    Panel("Chunk cache hit ratio", "hits / (hits + misses)", (
        ("hit ratio", 'sum(rate(chunkgate_cache_hits_total{sel}[{w}])) / (sum(rate(chunkgate_cache_hits_total{sel}[{w}]))'
                      ' + sum(rate(chunkgate_cache_misses_total{sel}[{w}])))'),
    ), ratio=True),
    Panel("Locks", "locks", (
        ("active", 'sum(chunkgate_locks_active{sel})'),
        ("waiting", 'sum(chunkgate_locks_waiting{sel})'),
    )),
    Panel("tus upload throughput", "MiB/s", (
        ("received", 'sum(rate(chunkgate_upload_bytes_total{sel}[{w}]))'),
    ), scale=2**20),
)


def render(template: str, *, window: str, instance: str | None) -> str:
    # str.format would trip over PromQL's own braces, so substitute the two names by hand.
    sel = "{instance=~" + json.dumps(instance) + "}" if instance else ""
    return template.replace("{w}", window).replace("{sel}", sel)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The ``result`` of a range query (a list of {metric, values}); raises RuntimeError on an API error."""
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    url = prometheus.rstrip("/") + "/api/v1/query_range?" + params
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the JSON body
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body.get('error', body)}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for name, value in labels.items():
        out = out.replace("{" + name + "}", value)
    return out


def plot(prometheus: str, output: str, *, minutes: float, step: float | None, window: str,
         instance: str | None, title: str | None) -> dict[str, int]:
    """Query every panel and write the PNG; returns how many series each panel drew."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    end = time.time()
    start = end - minutes * 60
    # About 300 points per line whatever the range: enough to see bursts, small enough to draw fast.
    step = step or max(1.0, round(minutes * 60 / 300))

    fig, axes = plt.subplots(3, 2, figsize=(12, 10), dpi=80, sharex=True)
    drawn: dict[str, int] = {}
    for ax, panel in zip(axes.flat, PANELS):
        for label_template, template in panel.queries:
            for series in query_range(prometheus, render(template, window=window, instance=instance), start, end, step):
                xs = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                ys = [float(v) / panel.scale for _, v in series["values"]]  # "NaN" parses to nan: a gap in the line
                if not any(math.isfinite(y) for y in ys):
                    continue
                ax.plot(xs, ys, label=legend(label_template, series["metric"]), linewidth=1.4)
                drawn[panel.title] = drawn.get(panel.title, 0) + 1
        ax.set_title(panel.title, fontsize=11)
        ax.set_ylabel(panel.unit, fontsize=9)
        ax.grid(True, alpha=0.3)
        if panel.ratio:
            ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        if ax.lines:
            ax.legend(fontsize=8, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.suptitle(title or f"chunkgate — last {minutes:g} min from {prometheus}", fontsize=13)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(output, format="png")
    plt.close(fig)
    return drawn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot chunkgate's key series from Prometheus into a PNG.")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=15.0, help="how far back to plot")
    parser.add_argument("--step", type=float, default=None, help="seconds between points (default: range/300)")
    parser.add_argument("--rate-window", default="1m",
                        help="range of rate() (at least 4 scrape intervals; e.g. 10s with a 1s scrape)")
    parser.add_argument("--instance", default=None, help="regex of the instance(s) to plot (default: all)")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--output", default="metrics.png", help="PNG file to write")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    try:
        drawn = plot(args.prometheus, args.output, minutes=args.minutes, step=args.step, window=args.rate_window,
                     instance=args.instance, title=args.title)
    except (OSError, RuntimeError) as exc:
        print(f"plot_metrics: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({sum(drawn.values())} series)")
    empty = [panel.title for panel in PANELS if not drawn.get(panel.title)]
    if empty:
        # Not an error (a quiet gateway has no uploads), but worth saying: the panel reads "no data".
        print(f"plot_metrics: no data for: {', '.join(empty)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
