"""Read the chunkgate Grafana dashboard and alert rules the way a checker needs them.

What this module is for: one place that knows how to walk ops/grafana/chunkgate.json (rows,
collapsed rows, targets), substitute Grafana's template variables into a PromQL expression, and
list the metric names and selectors an expression uses. tests/test_ops_files.py checks the files
with it offline; a live test (a real Prometheus scraping a real gateway) can reuse
`iter_panel_queries()` to evaluate every panel expression.

What it must never do: start processes, talk to the network, or import the gateway at module
import time (only `agreed_metric_names()` looks for `gateway.metrics`, lazily), so the ops checks
run even while the gateway does not import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO_ROOT / "ops" / "grafana" / "chunkgate.json"
ALERTS_PATH = REPO_ROOT / "ops" / "prometheus" / "alerts.yml"

# The only datasource reference a panel, target or variable may carry.
DATASOURCE_REF: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

# Series that exist without the gateway naming them: Prometheus' own per-target `up`, and the
# prometheus_client process collector (Linux) the gateway exports alongside its own metrics.
EXTERNAL_METRIC_NAMES: frozenset[str] = frozenset({
    "up",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
})

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's variable syntaxes: $name, ${name}, ${name:format}, [[name]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel."""

    panel_title: str
    ref_id: str
    raw_expr: str  # as stored in the dashboard, with Grafana variables
    expr: str  # variables substituted: plain PromQL


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_alert_rules(path: Path = ALERTS_PATH) -> list[dict[str, Any]]:
    """Every alerting rule of every group, as written in the rules file."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels tucked inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def template_variable(dashboard: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("name") == name:
            return variable
    return None


def substitute_variables(
    expr: str,
    *,
    instance: str = ".*",
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
    extra: Mapping[str, str] | None = None,
) -> str:
    """`expr` with Grafana's variables replaced, as Grafana would send it to Prometheus.

    `instance` goes in verbatim inside a quoted regex matcher: pass `instance_regex(host_port, ...)`
    for chosen targets, or ".*" (the dashboard's All value) for all. An unknown variable raises
    KeyError, so a panel that grows a new variable cannot slip past the checks unsubstituted.
    """
    values = {
        "instance": instance,
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
        **(extra or {}),
    }

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        return values[name]

    return _VARIABLE.sub(replace, expr)


def instance_regex(*instances: str) -> str:
    """The value Grafana puts into `instance=~"$instance"` when these instances are selected.

    Each value is regex-escaped, and the backslashes doubled because the regex sits inside a
    PromQL double-quoted string (a bare `\\.` there is a parse error).
    """
    alternatives = [re.escape(instance).replace("\\", "\\\\") for instance in instances]
    return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"


def iter_panel_queries(
    dashboard: Mapping[str, Any] | None = None,
    *,
    instance: str = ".*",
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
) -> Iterator[PanelQuery]:
    """Every (panel title, expr) of the dashboard, with variables substituted (see above)."""
    board = load_dashboard() if dashboard is None else dashboard
    for panel in iter_panels(board):
        for target in panel.get("targets", []):
            raw = target.get("expr", "")
            if not raw:
                continue
            yield PanelQuery(
                panel_title=panel.get("title", ""),
                ref_id=target.get("refId", ""),
                raw_expr=raw,
                expr=substitute_variables(
                    raw, instance=instance, rate_interval=rate_interval, interval=interval, range_=range_
                ),
            )


def recording_rules_file(exprs: Mapping[str, str]) -> str:
    """A Prometheus rules file with one recording rule per expr, so `promtool check rules` parses them."""
    rules = [{"record": name, "expr": expr} for name, expr in exprs.items()]
    return yaml.safe_dump({"groups": [{"name": "dashboard_exprs", "rules": rules}]}, sort_keys=False)


def vector_selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (op, value)}) for every vector selector in a plain PromQL expr.

    Needs the promql-parser package (a Rust PromQL parser); raises ValueError on bad PromQL.
    """
    import promql_parser

    found: list[tuple[str, dict[str, tuple[str, str]]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (_match_op(m.op), m.value) for m in node.matchers.matchers}
            found.append((node.name or matchers.get("__name__", ("", ""))[1], matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def _match_op(op: Any) -> str:
    return {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}.get(str(op).rsplit(".", 1)[-1], str(op))


def agreed_metric_names() -> frozenset[str]:
    """The exporter's metric names (gateway.metrics.METRIC_NAMES)."""
    from gateway.metrics import METRIC_NAMES

    return frozenset(METRIC_NAMES)


def is_known_series(name: str, metric_names: frozenset[str]) -> bool:
    """Whether `name` is a series the gateway (or Prometheus) exposes, given the exporter's names."""
    if name in metric_names or name in EXTERNAL_METRIC_NAMES:
        return True
    # A histogram is listed by its family name; PromQL reads its _bucket/_sum/_count series.
    return any(
        name.endswith(suffix) and name[: -len(suffix)] in metric_names and not name[: -len(suffix)].endswith("_total")
        for suffix in HISTOGRAM_SUFFIXES
    )
