"""Checks of the operator files: Prometheus alerts and scrape config, Grafana dashboard and provisioning.

What this module is for: an operator who installs ops/ must get rules Prometheus loads, alerts that
fire when they should (promtool's unit tests), and a dashboard whose every panel queries the
chosen datasource and instances with valid PromQL over metrics the gateway really exports.
What it must never do: need a network, a running Prometheus or Grafana, or a running gateway.
promtool (Debian package `prometheus`) and promql-parser (PyPI) are required under CI=true and
skipped with a reason elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support.dashboard import (
    ALERTS_PATH,
    DASHBOARD_PATH,
    DATASOURCE_REF,
    REPO_ROOT,
    agreed_metric_names,
    instance_regex,
    is_known_series,
    iter_panel_queries,
    iter_panels,
    load_alert_rules,
    load_dashboard,
    recording_rules_file,
    substitute_variables,
    template_variable,
    vector_selectors,
)

PROMETHEUS_DIR = REPO_ROOT / "ops" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "ops" / "grafana"
ALERTS_TEST_PATH = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG_PATH = PROMETHEUS_DIR / "prometheus.yml"

REQUIRED_ROWS = ("traffic", "latency", "throughput", "cache", "store", "locks", "integrity", "uploads")
REQUIRED_ALERT_EXPRS = {
    # What each required alert must look at, so a rewrite cannot silently drop one.
    "ChunkgateDown": "up",
    "ChunkgateHighErrorRate": "chunkgate_http_requests_total",
    "ChunkgateStoreErrorRate": "chunkgate_backend_requests_total",
    "ChunkgateChunkRejected": "chunkgate_chunk_size_mismatch_total",
    "ChunkgateChunkChecksumMismatch": "chunkgate_chunk_checksum_mismatch_total",
    "ChunkgateTooManyActiveLocks": "chunkgate_locks_active",
    "ChunkgateLockHeldTooLong": "chunkgate_lock_oldest_age_seconds",
    "ChunkgateLockTimeouts": "chunkgate_lock_timeouts_total",
    "ChunkgateStaleLocksCleared": "chunkgate_lock_stale_cleared_total",
    "ChunkgateUploadsFailing": "chunkgate_uploads_completed_total",
    "ChunkgateHookEventsStuck": "chunkgate_hook_outbox_oldest_age_seconds",
}
INSTANCE_MARK = "__instance_filter__"


def _missing(what: str, how: str) -> None:
    """Fail under CI (the tool is part of CI's setup), skip with a reason on a developer machine."""
    message = f"{what} is not installed ({how})"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool", "apt-get install prometheus")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def promql_parser() -> ModuleType:
    try:
        import promql_parser as module
    except ImportError:
        _missing("promql-parser", "pip install promql-parser")
        raise
    return module


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def assert_promtool_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"promtool failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    return load_alert_rules()


# --- Prometheus -----------------------------------------------------------------------------------


def test_alert_rules_load_in_promtool(promtool: str) -> None:
    assert_promtool_ok(run_promtool(promtool, "check", "rules", str(ALERTS_PATH)))


def test_alert_unit_tests_pass_in_promtool(promtool: str) -> None:
    assert_promtool_ok(run_promtool(promtool, "test", "rules", str(ALERTS_TEST_PATH)))


def test_scrape_config_is_valid_in_promtool(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", str(SCRAPE_CONFIG_PATH))
    assert_promtool_ok(result)
    # check config also loads rule_files; make sure it really found the alerts.
    assert "alerts.yml" in result.stdout + result.stderr


def test_scrape_config_scrapes_chunkgate_every_15s_and_loads_the_alerts() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG_PATH.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chunkgate"]
    assert job["scrape_interval"] == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == ["127.0.0.1:8080"]


def test_alert_rules_are_in_group_chunkgate() -> None:
    document = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    assert [group["name"] for group in document["groups"]] == ["chunkgate"]


@pytest.mark.parametrize(("alert", "metric"), sorted(REQUIRED_ALERT_EXPRS.items()))
def test_required_alert_exists_and_watches_its_metric(
    alert_rules: list[dict[str, Any]], alert: str, metric: str
) -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules}
    assert alert in by_name, f"missing alert {alert}"
    assert re.search(rf"\b{re.escape(metric)}\b", by_name[alert]["expr"]), by_name[alert]["expr"]


def test_every_alert_has_severity_and_templated_summary_and_description(
    alert_rules: list[dict[str, Any]],
) -> None:
    for rule in alert_rules:
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert annotations.get(key), f"{rule['alert']} has no {key}"
        text = annotations["summary"] + annotations["description"]
        assert "$labels" in text or "$value" in text, f"{rule['alert']} annotations are not templated"


def test_every_alert_has_a_firing_and_a_quiet_promtool_case(alert_rules: list[dict[str, Any]]) -> None:
    document = yaml.safe_load(ALERTS_TEST_PATH.read_text(encoding="utf-8"))
    cases = [case for test in document["tests"] for case in test.get("alert_rule_test", [])]
    for rule in alert_rules:
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        firing = [case for case in mine if case.get("exp_alerts")]
        quiet = [case for case in mine if not case.get("exp_alerts")]
        assert firing, f"{name}: no promtool case where it fires"
        assert quiet, f"{name}: no promtool case where it stays quiet"
        for case in firing:
            for expected in case["exp_alerts"]:
                assert expected.get("exp_labels", {}).get("severity") == rule["labels"]["severity"], name
                assert set(expected.get("exp_annotations", {})) >= {"summary", "description"}, name


def test_alert_exprs_use_only_exported_metrics(
    alert_rules: list[dict[str, Any]], promql_parser: ModuleType
) -> None:
    names = agreed_metric_names()
    for rule in alert_rules:
        for metric, _ in vector_selectors(rule["expr"]):
            assert is_known_series(metric, names), f"{rule['alert']} uses unknown metric {metric}"


# --- Grafana dashboard ----------------------------------------------------------------------------


def test_dashboard_is_identified_as_chunkgate(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "chunkgate"
    assert dashboard["title"] == "chunkgate"
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_dashboard_has_a_prometheus_datasource_variable(dashboard: dict[str, Any]) -> None:
    variable = template_variable(dashboard, "datasource")
    assert variable is not None
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")


def test_dashboard_instance_variable_lists_gateways_and_allows_many(dashboard: dict[str, Any]) -> None:
    variable = template_variable(dashboard, "instance")
    assert variable is not None
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    assert query == "label_values(chunkgate_http_requests_total, instance)"
    assert variable["multi"] is True and variable["includeAll"] is True
    assert variable["datasource"] == DATASOURCE_REF


def test_dashboard_never_needs_an_import_time_datasource(dashboard: dict[str, Any]) -> None:
    # ${DS_PROMETHEUS}-style inputs only resolve through the UI import dialog, never provisioning.
    text = DASHBOARD_PATH.read_text(encoding="utf-8")
    assert "${DS_" not in text and "$DS_" not in text
    assert "__inputs" not in dashboard


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in iter_panels(dashboard):
        assert panel.get("datasource") == DATASOURCE_REF, panel.get("title")
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE_REF, (panel.get("title"), target.get("refId"))


def test_dashboard_has_the_agreed_rows(dashboard: dict[str, Any]) -> None:
    rows = {panel["title"].lower() for panel in iter_panels(dashboard) if panel["type"] == "row"}
    missing = [row for row in REQUIRED_ROWS if row not in rows]
    assert not missing, f"rows missing: {missing}"


def test_every_panel_is_a_timeseries_or_stat_with_a_unit_and_a_query(dashboard: dict[str, Any]) -> None:
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel.get("targets"), f"{panel['title']} has no query"


def test_dashboard_uses_the_expected_units(dashboard: dict[str, Any]) -> None:
    units = {
        panel["fieldConfig"]["defaults"]["unit"] for panel in iter_panels(dashboard) if panel["type"] != "row"
    }
    assert {"bytes", "s", "reqps", "percentunit"} <= units


def test_panel_titles_are_unique(dashboard: dict[str, Any]) -> None:
    titles = [panel["title"] for panel in iter_panels(dashboard)]
    duplicates = sorted({title for title in titles if titles.count(title) > 1})
    assert not duplicates, f"duplicate panel titles: {duplicates}"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_dashboard_expr_parses_in_promtool(
    dashboard: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    queries = list(iter_panel_queries(dashboard))
    assert len(queries) >= 40
    exprs = {f"dashboard:panel_{index}": query.expr for index, query in enumerate(queries)}
    rules = tmp_path / "dashboard_exprs.yml"
    rules.write_text(recording_rules_file(exprs), encoding="utf-8")
    result = run_promtool(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, (
        "a dashboard expression does not parse:\n" + result.stdout + result.stderr + "\n"
        + "\n".join(f"{name}: {expr}" for name, expr in exprs.items())
    )


def test_every_dashboard_selector_filters_the_chosen_instances(
    dashboard: dict[str, Any], promql_parser: ModuleType
) -> None:
    for query in iter_panel_queries(dashboard, instance=INSTANCE_MARK):
        for metric, matchers in vector_selectors(query.expr):
            assert matchers.get("instance") == ("=~", INSTANCE_MARK), (
                f"{query.panel_title}: {metric} is not filtered by instance=~\"$instance\""
            )


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any], promql_parser: ModuleType) -> None:
    names = agreed_metric_names()
    used = {metric for query in iter_panel_queries(dashboard) for metric, _ in vector_selectors(query.expr)}
    variable_query = template_variable(dashboard, "instance")["query"]["query"]
    used.add(re.search(r"label_values\((\w+)", variable_query).group(1))
    unknown = sorted(name for name in used if not is_known_series(name, names))
    assert not unknown, f"dashboard uses metrics the gateway does not export: {unknown}"


def test_committed_dashboard_matches_its_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(GRAFANA_DIR / "build_dashboard.py"), "--check"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Grafana provisioning -------------------------------------------------------------------------


def test_datasource_provisioning_points_at_local_prometheus() -> None:
    document = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert document["apiVersion"] == 1
    (source,) = document["datasources"]
    assert (source["type"], source["uid"], source["url"]) == ("prometheus", "prometheus", "http://127.0.0.1:9090")


def test_dashboard_provisioning_loads_the_mounted_dashboard_directory() -> None:
    path = GRAFANA_DIR / "provisioning" / "dashboards" / "chunkgate.yml"
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    mount = provider["options"]["path"]
    assert mount.startswith("/")
    # Operators learn where to mount chunkgate.json from the file's comment.
    comments = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    assert f"{mount.rstrip('/')}/chunkgate.json" in comments


# --- the helpers the live test will reuse ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('rate(x{instance=~"$instance"}[$__rate_interval])', 'rate(x{instance=~"gw:1"}[2m])'),
        ('x{instance=~"${instance}"}', 'x{instance=~"gw:1"}'),
        ('x{instance=~"${instance:regex}"}', 'x{instance=~"gw:1"}'),
        ('x{instance=~"[[instance]]"}', 'x{instance=~"gw:1"}'),
        ("increase(x[$__range])", "increase(x[3h])"),
        ("avg_over_time(x[$__interval])", "avg_over_time(x[30s])"),
        ('x{status=~"5.."}', 'x{status=~"5.."}'),
    ],
)
def test_substitute_variables_replaces_grafana_variables(raw: str, expected: str) -> None:
    assert substitute_variables(raw, instance="gw:1", rate_interval="2m", interval="30s", range_="3h") == expected


def test_substitute_variables_refuses_an_unknown_variable() -> None:
    with pytest.raises(KeyError):
        substitute_variables("x{job=~\"$job\"}")


def test_panel_queries_name_their_panel_and_leave_no_variable(dashboard: dict[str, Any]) -> None:
    queries = list(iter_panel_queries(dashboard, instance="gw:1"))
    titles = {query.panel_title for query in queries}
    assert "Request rate" in titles and "Oldest lock age" in titles
    for query in queries:
        assert "$" not in query.expr and "[[" not in query.expr, query


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        (("127.0.0.1:8080",), r"127\\.0\\.0\\.1:8080"),
        (("a:1", "b.c:2"), r"(a:1|b\\.c:2)"),
    ],
)
def test_instance_regex_escapes_for_a_promql_string(instances: tuple[str, ...], expected: str) -> None:
    assert instance_regex(*instances) == expected


def test_panel_queries_for_a_dotted_instance_are_valid_promql(
    dashboard: dict[str, Any], promql_parser: ModuleType
) -> None:
    # A single-escaped "127\.0" is a PromQL parse error; this is what a live test will send.
    for query in iter_panel_queries(dashboard, instance=instance_regex("127.0.0.1:8080")):
        for _, matchers in vector_selectors(query.expr):
            assert matchers["instance"] == ("=~", r"127\.0\.0\.1:8080"), query.panel_title
