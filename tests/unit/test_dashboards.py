"""The Grafana dashboards of deploy/grafana/dashboards, and the metrics they and the alerts query.

Every metric name in a dashboard or alert expression must be one the exporter serves
(`metrics.metric_names()`), so a renamed metric fails here instead of drawing an empty panel.
Dashboard PromQL is also parsed by promtool; a missing promtool fails with the fix, never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from engagement_dagster.lib.metrics import metric_names

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
DASHBOARDS = ("overview", "performance", "errors", "business")
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules" / "engagement.yml"
README = REPO_ROOT / "README.md"

GRID_COLUMNS = 24
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge"}
# Metrics Prometheus itself adds to every scrape.
PROMETHEUS_METRICS = {"up"}
# What Grafana substitutes in a query, with a value that parses the same way.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

# Words of PromQL that are not metric names when not followed by "(" (functions always are).
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{?\w+(?::\w+)?\}?")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_NUMBER = re.compile(
    r"(?<![\w:.])(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*(?![\w:])"
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, aggregations,
    keywords, label names (in {...}, by (...), on (...)), durations, numbers or strings."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def unknown_metrics(exprs: list[str]) -> set[str]:
    known = metric_names() | PROMETHEUS_METRICS
    return {name for expr in exprs for name in promql_metric_names(expr)} - known


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed; it parses the dashboards' PromQL. Fix: `make install` "
            "(scripts/bootstrap.sh) or `sudo apt-get install -y --no-install-recommends "
            "prometheus`",
            pytrace=False,
        )
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, check=False)


@cache
def load(name: str) -> dict[str, Any]:
    path = DASHBOARD_DIR / f"{name}.json"
    assert path.is_file(), f"{path.relative_to(REPO_ROOT)} is missing"
    board = json.loads(path.read_text())
    assert isinstance(board, dict), f"{name}.json is not a JSON object"
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_dashboard_folder_holds_exactly_the_four_dashboards() -> None:
    found = sorted(path.stem for path in DASHBOARD_DIR.glob("*.json"))
    assert found == sorted(DASHBOARDS), f"deploy/grafana/dashboards holds {found}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_has_the_fields_grafana_provisioning_needs(name: str) -> None:
    board = load(name)
    for key in ("uid", "title", "tags", "schemaVersion", "time", "templating", "panels"):
        assert board.get(key), f"{name}.json has no {key}"
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]), f"{name}.json uid {board['uid']!r}"
    assert board["schemaVersion"] >= 36, f"{name}.json schemaVersion {board['schemaVersion']}"
    assert "engagement" in board["tags"], f"{name}.json is not tagged engagement"
    assert board.get("id") is None, f"{name}.json has a database id: provisioning assigns it"
    assert {"from", "to"} <= set(board["time"]), f"{name}.json time is {board['time']}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables.get("datasource") or {}
    assert datasource.get("type") == "datasource" and datasource.get("query") == "prometheus", (
        f"{name}.json has no Prometheus datasource variable `datasource`: {variables}"
    )


def test_dashboards_have_unique_uids_and_titles() -> None:
    uids = [load(name)["uid"] for name in DASHBOARDS]
    titles = [load(name)["title"] for name in DASHBOARDS]
    assert len(set(uids)) == len(uids), f"dashboard uids repeat: {uids}"
    assert len(set(titles)) == len(titles), f"dashboard titles repeat: {titles}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_are_well_formed(name: str) -> None:
    ids: list[int] = []
    for panel in panels(load(name)):
        title = panel.get("title")
        assert title, f"{name}.json has a panel without a title (id {panel.get('id')})"
        assert isinstance(panel.get("id"), int), f"{name}.json panel {title!r} has no int id"
        ids.append(panel["id"])
        assert panel.get("type") in PANEL_TYPES, (
            f"{name}.json panel {title!r} has type {panel.get('type')!r}, not one of "
            f"{sorted(PANEL_TYPES)}"
        )
        assert panel.get("datasource", {}).get("uid") == "${datasource}", (
            f"{name}.json panel {title!r} does not query the ${{datasource}} variable"
        )
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{name}.json panel {title!r} sets no unit (fieldConfig.defaults.unit)"
        targets = panel.get("targets") or []
        assert targets, f"{name}.json panel {title!r} has no targets"
        refs = [target.get("refId") for target in targets]
        assert len(set(refs)) == len(refs) and all(refs), (
            f"{name}.json panel {title!r} has missing or repeated refIds {refs}"
        )
        for target in targets:
            assert target.get("expr", "").strip(), f"{name}.json panel {title!r}: target no expr"
            assert "legendFormat" in target, f"{name}.json panel {title!r}: no legendFormat"
            assert target.get("datasource", {}).get("uid") == "${datasource}", (
                f"{name}.json panel {title!r} target {target['refId']} bypasses ${{datasource}}"
            )
    assert len(set(ids)) == len(ids), f"{name}.json repeats panel ids: {sorted(ids)}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(load(name)):
        grid = panel.get("gridPos") or {}
        title = str(panel.get("title"))
        assert all(isinstance(grid.get(key), int) for key in "xywh"), f"{title!r} gridPos {grid}"
        x, y, w, h = (int(grid[key]) for key in "xywh")
        assert x >= 0 and y >= 0 and w > 0 and h > 0, f"{title!r} gridPos {grid}"
        assert x + w <= GRID_COLUMNS, f"{name}.json panel {title!r} ends at column {x + w} > 24"
        for column in range(x, x + w):
            for row in range(y, y + h):
                other = cells.setdefault((column, row), title)
                assert other == title, f"{name}.json panels {other!r} and {title!r} overlap"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_dashboard_metric_exists(name: str) -> None:
    missing = unknown_metrics(dashboard_exprs(load(name)))
    assert not missing, (
        f"{name}.json queries metrics the exporter never serves: {sorted(missing)} "
        "(engagement_dagster/lib/metrics.py metric_names())"
    )


def test_every_alert_rule_metric_exists() -> None:
    missing = unknown_metrics(alert_exprs())
    assert not missing, (
        f"{RULES.relative_to(REPO_ROOT)} queries metrics the exporter never serves: "
        f"{sorted(missing)}"
    )


def test_the_dashboards_query_the_metrics_the_issue_asks_for() -> None:
    queried = {
        name: {metric for expr in dashboard_exprs(load(name)) for metric in
               promql_metric_names(expr)}
        for name in DASHBOARDS
    }  # fmt: skip
    wanted = {
        "overview": {
            "engagement_changes_read_total", "engagement_sink_rows_applied_total",
            "engagement_slot_lag_bytes", "engagement_sink_latency_seconds_bucket",
            "engagement_sink_up", "engagement_slot_active", "engagement_dead_letters_total",
        },
        "performance": {
            "engagement_sink_latency_seconds_bucket", "engagement_batch_rows_bucket",
            "engagement_process_cpu_seconds_total", "engagement_process_resident_memory_bytes",
            "engagement_sink_queued_rows", "engagement_sink_lag_bytes",
            "engagement_slot_retained_wal_bytes",
        },
        "errors": {
            "engagement_sink_errors_total", "engagement_sink_retries_total",
            "engagement_sink_replays_total", "engagement_dead_letters_total",
            "engagement_unknown_content_events_total", "engagement_exporter_source_up",
        },
        "business": {
            "engagement_top_content_engagement_seconds", "engagement_top_content_events",
            "engagement_engagement_seconds_total", "engagement_enriched_events_total",
        },
    }  # fmt: skip
    for name, metrics in wanted.items():
        assert not metrics - queried[name], f"{name}.json lacks {sorted(metrics - queried[name])}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    # promtool has no bare expression parser here; a recording rule per query is one.
    rules = []
    for name in DASHBOARDS:
        for i, expr in enumerate(dashboard_exprs(load(name))):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:{name}:{i}", "expr": expr})
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, (
        f"a dashboard query is not valid PromQL:\n{result.stdout}\n{result.stderr}"
    )


def test_readme_lists_every_metric() -> None:
    readme = README.read_text()
    names = metric_names()
    histograms = {name.removesuffix("_bucket") for name in names if name.endswith("_bucket")}
    families = histograms | {
        name for name in names if re.sub(r"_(bucket|sum|count)$", "", name) not in histograms
    }
    missing = sorted(name for name in families if f"`{name}`" not in readme)
    assert not missing, f"README.md's metric table (Monitoring) lacks {missing}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (sink, le) (rate(a_bucket{sink=~"x|y"}[5m]))) > 5',
            {"a_bucket"},
        ),
        ('up{job="engagement"} == 0 or absent(up{job="engagement"})', {"up"}),
        ("changes(a[2m]) == 0 and on() changes(b[2m]) > 0", {"a", "b"}),
        ("time() - a_timestamp_seconds", {"a_timestamp_seconds"}),
        ("a / (b + c) < 0.2", {"a", "b", "c"}),
        ("sum(rate(a_total[$__rate_interval])) > 1e9", {"a_total"}),
        ("sum without (pid) (a) * on (sink) group_left (slot) b offset 5m", {"a", "b"}),
        ("sort_desc(a) > bool 1073741824", {"a"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ("max_over_time(a[10m:1m]) unless b", {"a", "b"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_a_query_of_a_metric_that_does_not_exist_is_caught() -> None:
    exprs = ["sum by (sink) (rate(engagement_sink_rows_written_total[5m]))", "up"]
    assert unknown_metrics(exprs) == {"engagement_sink_rows_written_total"}
