"""Build the chunkgate Grafana dashboard (ops/grafana/chunkgate.json) from compact panel definitions.

What this module is for: the dashboard is a few hundred panels' worth of repetitive JSON; writing
it by hand invites a panel without the instance filter or with a hard-coded datasource. Here each
panel is one line of intent (title, queries, unit) and the JSON is generated from it, so every
panel gets the same datasource reference, `{instance=~"$instance"}` filter and layout rules.
Run `python ops/grafana/build_dashboard.py` after editing and commit both files;
tests/test_ops_files.py fails when chunkgate.json and this generator disagree.

What it must never do: reference a datasource other than the `${datasource}` template variable
(no `${DS_...}` import inputs: those break file provisioning), or import anything from the
chunkgate packages (the dashboard must build without the gateway installed).

Chose plain dicts over grafanalib: grafanalib lags Grafana's schema (no schemaVersion 39 panel
options) and would be one more dependency for ~40 panels.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_FILE = Path(__file__).resolve().parent / "chunkgate.json"

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24

# Grafana picks a step-aware window for rate(); fixed windows would alias at long time ranges.
RATE = "$__rate_interval"


def sel(metric: str, extra: str = "") -> str:
    """A vector selector for `metric` limited to the chosen instances (plus `extra` matchers)."""
    matchers = 'instance=~"$instance"' + (f", {extra}" if extra else "")
    return f"{metric}{{{matchers}}}"


def rate(metric: str, extra: str = "", window: str = RATE) -> str:
    return f"rate({sel(metric, extra)}[{window}])"


def quantile(q: float, histogram: str, by: str, extra: str = "") -> str:
    grouping = ", ".join(["le", *[part.strip() for part in by.split(",") if part.strip()]])
    return f"histogram_quantile({q}, sum by ({grouping}) ({rate(histogram + '_bucket', extra)}))"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    kind: str  # "timeseries" or "stat"
    title: str
    queries: tuple[Query, ...]
    unit: str
    description: str
    width: int = 8
    height: int = 8
    # Stat colour steps as (value, colour), the base colour first with value None.
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    minimum: float | None = 0


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def ts(
    title: str,
    unit: str,
    description: str,
    *queries: Query,
    width: int = 8,
    height: int = 8,
    minimum: float | None = 0,
) -> Panel:
    return Panel("timeseries", title, queries, unit, description, width, height, minimum=minimum)


def stat(
    title: str,
    expr: str,
    unit: str,
    description: str,
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),),
    width: int = 4,
    height: int = 4,
) -> Panel:
    return Panel("stat", title, (Query(expr),), unit, description, width, height, thresholds)


HTTP = "chunkgate_http_requests_total"
STORE = "chunkgate_backend_requests_total"
STORE_ERRORS = 'outcome=~"transient|permanent"'
# Error series appear only with the first error; `or vector(0)` shows 0% instead of "No data".
HTTP_5XX = 'status=~"5.."'
HTTP_ERRORS = 'status=~"4..|5.."'
JOB = 'job="chunkgate"'
REJECTED = 'verdict="rejected"'
TOLERATED = 'verdict="tolerated"'

ROWS: tuple[Row, ...] = (
    Row("Traffic", (
        stat("Request rate", f"sum({rate(HTTP)})", "reqps",
             "HTTP requests per second across the selected gateways.", width=6),
        stat("5xx ratio", f"(sum({rate(HTTP, HTTP_5XX)}) or vector(0)) / sum({rate(HTTP)})", "percentunit",
             "Share of requests answered with a 5xx. The ChunkgateHighErrorRate alert fires above 5% for 5m.",
             ((None, "green"), (0.01, "orange"), (0.05, "red")), width=6),
        stat("In-flight requests", f"sum({sel('chunkgate_http_requests_in_flight')})", "short",
             "Requests being served right now.", width=6),
        stat("Gateways up", f"sum({sel('up', JOB)})", "short",
             "Selected gateways Prometheus can scrape.", ((None, "red"), (1, "green")), width=6),
        ts("Requests/s by route and status", "reqps",
           "Request rate per route template and status code.",
           Query(f"sum by (route, status) ({rate(HTTP)})", "{{route}} {{status}}"), width=12),
        ts("Errors/s by route and status", "reqps",
           "4xx and 5xx answers per route. 416/412/304 are normal for players; 5xx are not.",
           Query(f"sum by (route, status) ({rate(HTTP, HTTP_ERRORS)})", "{{route}} {{status}}"),
           width=12),
    )),
    Row("Latency", (
        ts("Latency p50 by route", "s", "Median request duration per route (to the last body byte).",
           Query(quantile(0.5, "chunkgate_http_request_duration_seconds", "route"), "{{route}}")),
        ts("Latency p99 by route", "s", "99th percentile request duration per route.",
           Query(quantile(0.99, "chunkgate_http_request_duration_seconds", "route"), "{{route}}")),
        ts("Mean latency by route", "s", "Mean request duration per route.",
           Query(f"sum by (route) ({rate('chunkgate_http_request_duration_seconds_sum')})"
                 f" / sum by (route) ({rate('chunkgate_http_request_duration_seconds_count')})",
                 "{{route}}")),
    )),
    Row("Throughput", (
        ts("HTTP bytes/s", "binBps", "Body bytes sent to clients and received from them.",
           Query(f"sum({rate('chunkgate_http_response_bytes_total')})", "response (sent)"),
           Query(f"sum({rate('chunkgate_http_request_bytes_total')})", "request (received)")),
        ts("Response bytes/s by route", "binBps", "Body bytes sent per route.",
           Query(f"sum by (route) ({rate('chunkgate_http_response_bytes_total')})", "{{route}}")),
        ts("Store bytes/s", "binBps",
           "Bytes read from and written to the object store. Reads well above bytes sent mean the "
           "cache is not absorbing repeated reads.",
           Query(f"sum({rate('chunkgate_backend_bytes_read_total')})", "read"),
           Query(f"sum({rate('chunkgate_backend_bytes_written_total')})", "written")),
    )),
    Row("Cache", (
        stat("Hit ratio",
             f"sum({rate('chunkgate_cache_hits_total')}) / (sum({rate('chunkgate_cache_hits_total')})"
             f" + sum({rate('chunkgate_cache_misses_total')}))",
             "percentunit", "Share of chunk reads served from the in-memory cache.",
             ((None, "red"), (0.5, "orange"), (0.8, "green")), height=8),
        ts("Hit ratio by instance", "percentunit", "Cache hit ratio per gateway.",
           Query(f"sum by (instance) ({rate('chunkgate_cache_hits_total')}) / (sum by (instance) "
                 f"({rate('chunkgate_cache_hits_total')}) + sum by (instance) "
                 f"({rate('chunkgate_cache_misses_total')}))", "{{instance}}"),
           width=6),
        ts("Cache events/s", "ops",
           "Coalesced: requests that waited for a fetch already in flight instead of asking the store again.",
           Query(f"sum({rate('chunkgate_cache_hits_total')})", "hits"),
           Query(f"sum({rate('chunkgate_cache_misses_total')})", "misses"),
           Query(f"sum({rate('chunkgate_cache_coalesced_total')})", "coalesced"),
           Query(f"sum({rate('chunkgate_cache_evictions_total')})", "evictions"),
           Query(f"sum({rate('chunkgate_cache_readahead_total')})", "read-ahead")),
        ts("Cache size", "bytes", "Bytes of chunks held in the cache (bounded by --cache-size).",
           Query(f"sum by (instance) ({sel('chunkgate_cache_bytes')})", "{{instance}}"), width=6),
    )),
    Row("Store", (
        stat("Store error ratio",
             f"(sum({rate(STORE, STORE_ERRORS)}) or vector(0)) / sum({rate(STORE)})", "percentunit",
             "Share of store requests ending transient or permanent (not_found and precondition_failed "
             "are answers, not errors). ChunkgateStoreErrorRate fires above 5% for 5m.",
             ((None, "green"), (0.01, "orange"), (0.05, "red")), height=8),
        ts("Store requests/s by op and outcome", "reqps", "Object-store calls per operation and outcome.",
           Query(f"sum by (op, outcome) ({rate(STORE)})", "{{op}} {{outcome}}"), width=10),
        ts("Store latency p99 by op", "s", "99th percentile object-store call duration per operation.",
           Query(quantile(0.99, "chunkgate_backend_request_duration_seconds", "op"), "{{op}}"), width=10),
        ts("Store queue depth", "short",
           "Store requests waiting for the concurrency limiter; growth means the store is the bottleneck.",
           Query(f"sum by (instance) ({sel('chunkgate_backend_queue_depth')})", "{{instance}}"), width=12),
        ts("Store errors/s by op and outcome", "reqps", "Transient and permanent store failures.",
           Query(f"sum by (op, outcome) ({rate(STORE, STORE_ERRORS)})", "{{op}} {{outcome}}"), width=12),
    )),
    Row("Locks", (
        stat("Active locks", f"sum({sel('chunkgate_locks_active')})", "short",
             "Key locks held now. ChunkgateTooManyActiveLocks fires above 100 for 5m.",
             ((None, "green"), (100, "red"))),
        stat("Waiting for locks", f"sum({sel('chunkgate_locks_waiting')})", "short",
             "Requests queued behind a held lock.", ((None, "green"), (10, "orange"))),
        stat("Oldest lock age", f"max({sel('chunkgate_lock_oldest_age_seconds')})", "s",
             "Age of the oldest held lock. Above the 20s lock timeout, its waiters fail.",
             ((None, "green"), (10, "orange"), (20, "red"))),
        stat("Lock wait p99", quantile(0.99, "chunkgate_lock_wait_seconds", ""), "s",
             "99th percentile time a request waited for its lock.", ((None, "green"), (5, "orange"))),
        stat("Lock timeouts in range", f"sum(increase({sel('chunkgate_lock_timeouts_total')}[$__range]))",
             "short", "Requests that gave up waiting for a lock in the selected time range.",
             ((None, "green"), (1, "orange"))),
        stat("Stale locks cleared in range",
             f"sum(increase({sel('chunkgate_lock_stale_cleared_total')}[$__range]))", "short",
             "Leases cleared because their holder stopped renewing, in the selected time range.",
             ((None, "green"), (1, "orange"))),
        ts("Active and waiting locks", "short", "Locks held and requests waiting, per gateway.",
           Query(f"sum by (instance) ({sel('chunkgate_locks_active')})", "active {{instance}}"),
           Query(f"sum by (instance) ({sel('chunkgate_locks_waiting')})", "waiting {{instance}}")),
        ts("Oldest lock age by instance", "s", "Age of the oldest held lock per gateway; see GET /admin/locks for which key.",
           Query(f"max by (instance) ({sel('chunkgate_lock_oldest_age_seconds')})", "{{instance}}")),
        ts("Lock wait time", "s", "How long requests waited to get their lock.",
           Query(quantile(0.5, "chunkgate_lock_wait_seconds", ""), "p50"),
           Query(quantile(0.99, "chunkgate_lock_wait_seconds", ""), "p99")),
        ts("Lock acquisitions/s", "ops", "Locks granted per second, per gateway.",
           Query(f"sum by (instance) ({rate('chunkgate_lock_acquisitions_total')})", "{{instance}}")),
        ts("Lock trouble/s", "ops",
           "Timeouts, stale leases cleared, release requests sent to holders (e.g. a resumed tus "
           "upload), lease conflicts between gateways and takeovers.",
           Query(f"sum({rate('chunkgate_lock_timeouts_total')})", "timeouts"),
           Query(f"sum({rate('chunkgate_lock_stale_cleared_total')})", "stale cleared"),
           Query(f"sum({rate('chunkgate_lock_release_requests_total')})", "release requests"),
           Query(f"sum({rate('chunkgate_lock_lease_conflicts_total')})", "lease conflicts"),
           Query(f"sum({rate('chunkgate_lock_takeovers_total')})", "takeovers"),
           width=16),
    )),
    Row("Integrity", (
        stat("Rejected chunks in range",
             f"sum(increase({sel('chunkgate_chunk_size_mismatch_total', REJECTED)}[$__range]))",
             "short", "Chunks whose stored size was beyond tolerance: those reads failed.",
             ((None, "green"), (1, "red")), width=6),
        stat("Tolerated size mismatches in range",
             f"sum(increase({sel('chunkgate_chunk_size_mismatch_total', TOLERATED)}[$__range]))",
             "short", "Chunks within the size tolerance: served and re-recorded in the manifest.",
             ((None, "green"), (1, "orange")), width=6),
        stat("Checksum mismatches in range",
             f"sum(increase({sel('chunkgate_chunk_checksum_mismatch_total')}[$__range]))", "short",
             "Chunks with the right size but the wrong SHA-256: corrupt data.",
             ((None, "green"), (1, "red")), width=6),
        stat("Manifest repairs in range",
             f"sum(increase({sel('chunkgate_manifest_repairs_total')}[$__range]))", "short",
             "Manifests rewritten to record a tolerated chunk's real size and SHA-256.",
             ((None, "green"), (1, "orange")), width=6),
        ts("Size mismatches/s by verdict", "ops", "Chunk size disagreements with the manifest.",
           Query(f"sum by (verdict) ({rate('chunkgate_chunk_size_mismatch_total')})", "{{verdict}}")),
        ts("Checksum mismatches/s", "ops", "SHA-256 mismatches at the exact size.",
           Query(f"sum by (instance) ({rate('chunkgate_chunk_checksum_mismatch_total')})", "{{instance}}")),
        ts("Manifest repairs/s", "ops", "Manifests re-recorded after a tolerated mismatch.",
           Query(f"sum by (instance) ({rate('chunkgate_manifest_repairs_total')})", "{{instance}}")),
    )),
    Row("Uploads", (
        stat("Uploads in progress", f"sum({sel('chunkgate_uploads_in_progress')})", "short",
             "tus uploads started and not yet completed, aborted or expired.", height=8),
        ts("Upload outcomes/s", "ops", "tus uploads created, completed, aborted (terminated) and expired.",
           Query(f"sum({rate('chunkgate_uploads_created_total')})", "created"),
           Query(f"sum({rate('chunkgate_uploads_completed_total')})", "completed"),
           Query(f"sum({rate('chunkgate_uploads_aborted_total')})", "aborted"),
           Query(f"sum({rate('chunkgate_uploads_expired_total')})", "expired"),
           width=10),
        ts("Uploads in progress by instance", "short", "Open tus uploads per gateway.",
           Query(f"sum by (instance) ({sel('chunkgate_uploads_in_progress')})", "{{instance}}"), width=10),
        ts("Upload bytes/s", "binBps", "Bytes received through tus PATCH requests.",
           Query(f"sum({rate('chunkgate_upload_bytes_total')})", "received"), width=12),
        ts("Upload failure ratio", "percentunit",
           "Share of finished uploads that were aborted or expired. ChunkgateUploadsFailing fires above 50%.",
           Query(f"(sum({rate('chunkgate_uploads_aborted_total')}) + sum({rate('chunkgate_uploads_expired_total')}))"
                 f" / (sum({rate('chunkgate_uploads_aborted_total')}) + sum({rate('chunkgate_uploads_expired_total')})"
                 f" + sum({rate('chunkgate_uploads_completed_total')}))", "failed"),
           width=12),
    )),
    Row("Hooks", (
        stat("Oldest undelivered hook event", f"max({sel('chunkgate_hook_outbox_oldest_age_seconds')})", "s",
             "Age of the oldest post-finish/post-delete event not yet acknowledged by the application's hook. "
             "Events wait in the store and are retried; ChunkgateHookEventsStuck fires above 5 minutes.",
             ((None, "green"), (60, "orange"), (300, "red")), height=8),
        ts("Hook requests/s by type and outcome", "ops",
           "Events POSTed to --hook-url: ok = 2xx, refused = 4xx (a refused pre-create is a 403 for the client), "
           "error = no answer, timeout or 5xx.",
           Query(f"sum by (type, outcome) ({rate('chunkgate_hook_deliveries_total')})", "{{type}} {{outcome}}"),
           width=10),
        ts("Undelivered hook events", "short", "post-* events known to be waiting for delivery, per gateway.",
           Query(f"sum by (instance) ({sel('chunkgate_hook_outbox_pending')})", "{{instance}}"), width=10),
    )),
    Row("Objects and GC", (
        ts("Commits/s", "ops", "Manifests committed, and commits that lost a conditional-write race.",
           Query(f"sum({rate('chunkgate_objects_committed_total')})", "committed"),
           Query(f"sum({rate('chunkgate_commit_conflicts_total')})", "conflicts"), width=12),
        ts("GC deletions/s by kind", "ops", "Garbage collection: orphaned chunks, uploads and leases removed.",
           Query(f"sum by (kind) ({rate('chunkgate_gc_deleted_total')})", "{{kind}}"),
           Query(f"sum({rate('chunkgate_gc_runs_total')})", "runs"), width=12),
    )),
    Row("Process", (
        ts("Resident memory", "bytes",
           "Gateway RSS. Expect about cache size + (uploads in flight + 1) x chunk size; steady growth is a leak.",
           Query(f"sum by (instance) ({sel('process_resident_memory_bytes')})", "{{instance}}")),
        ts("CPU", "percentunit", "CPU time per second (100% = one core); Python serves on one core.",
           Query(f"sum by (instance) ({rate('process_cpu_seconds_total')})", "{{instance}}")),
        ts("Open file descriptors", "short", "Sockets and files held open, per gateway.",
           Query(f"sum by (instance) ({sel('process_open_fds')})", "{{instance}}")),
    )),
)


def _thresholds(steps: tuple[tuple[float | None, str], ...]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": colour, "value": value} for value, colour in steps]}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": dict(DATASOURCE),
            "editorMode": "code",
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": True,
            "refId": chr(ord("A") + index),
        }
        for index, query in enumerate(panel.queries)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": _thresholds(panel.thresholds)}
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
        }
        options: dict[str, Any] = {
            "legend": {"calcs": ["mean", "max", "lastNotNull"], "displayMode": "table",
                       "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    return {
        "datasource": dict(DATASOURCE),
        "description": panel.description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "id": panel_id,
        "options": options,
        "targets": targets,
        "title": panel.title,
        "type": panel.kind,
    }


def _layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Flow panels left to right under their row header, wrapping at the 24-column grid."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in rows:
        panels.append({
            "collapsed": False,
            # Rows carry the variable too, so "every panel names ${datasource}" holds without exceptions.
            "datasource": dict(DATASOURCE),
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
            "id": panel_id,
            "panels": [],
            "title": row.title,
            "type": "row",
        })
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if panel.width > GRID_WIDTH:
                raise ValueError(f"panel {panel.title!r} is wider than the grid")
            if x + panel.width > GRID_WIDTH:
                y += line_height
                x = 0
                line_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return panels


def build() -> dict[str, Any]:
    """The whole dashboard as a JSON-ready dict."""
    return {
        "annotations": {"list": []},
        "description": "chunkgate: HTTP traffic, store, cache, locks, integrity and uploads.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": _layout(ROWS),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["chunkgate"],
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "type": "datasource",
                },
                {
                    # ".*" rather than Grafana's joined list, so gateways started later are included.
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "datasource": dict(DATASOURCE),
                    "definition": "label_values(chunkgate_http_requests_total, instance)",
                    "hide": 0,
                    "includeAll": True,
                    "label": "Instance",
                    "multi": True,
                    "name": "instance",
                    "options": [],
                    "query": {
                        "qryType": 1,
                        "query": "label_values(chunkgate_http_requests_total, instance)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "chunkgate",
        "uid": "chunkgate",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write chunkgate.json, or with --check exit 1 when the committed file is out of date."""
    text = render()
    if "--check" in argv:
        if DASHBOARD_FILE.read_text(encoding="utf-8") != text:
            print(f"{DASHBOARD_FILE} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_FILE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
