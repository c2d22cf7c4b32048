"""deploy/grafana/flywheel.json and deploy/prometheus/alerts.yml reference only metrics services/metrics.py
exports (under Ray's names), the dashboard shows every one of them, and its layout is what Grafana loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from services import metrics

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "deploy/grafana/flywheel.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
ROWS = ["Throughput", "Learning", "Off-policyness", "Replay", "Weight sync"]
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, label
    matchers, grouping labels, durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\w+", " ", s)
    s = re.sub(r"\boffset\s+-?(\d+(ms|[smhdwy]))+", " ", s)
    s = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if s[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(m.group())
    return names


def _exported() -> dict[str, str]:
    return {name: spec.name for spec in metrics.METRICS for name in metrics.exported_names(spec)}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"]] + [c for p in dash["panels"] for c in p.get("panels", [])]


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]


def test_metric_names_parser_finds_selectors_only():
    expr = (
        'histogram_quantile(0.95, sum by (le, worker) (rate(ray_a_bucket{le!="+Inf",x=~"a|b"}[$__rate_interval])))'
        " / scalar(max(ray_b)) - on() group_left() time() + ray_c offset 5m > bool 1e-3 and ray_d"
    )
    assert metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c", "ray_d"}
    assert metric_names("sum(increase(flywheel_x_total[1h]))") == {"flywheel_x_total"}  # an unprefixed name is caught


@pytest.mark.grafana
def test_dashboard_references_only_exported_metrics_and_shows_every_one():
    exported = _exported()
    used = set().union(*(metric_names(e) for e in _exprs(_dashboard())))
    assert used, "no PromQL found in the dashboard"
    unknown = used - set(exported)
    assert not unknown, f"dashboard queries metrics services/metrics.py does not export: {sorted(unknown)}"
    missing = {spec.name for spec in metrics.METRICS} - {exported[n] for n in used}
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


@pytest.mark.grafana
def test_dashboard_layout_loads_in_grafana():
    dash = _dashboard()
    assert dash["uid"] == "flywheel" and isinstance(dash["schemaVersion"], int) and dash["title"]
    (var,) = dash["templating"]["list"]
    assert var == {**var, "name": "datasource", "type": "datasource", "query": "prometheus"}
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ROWS
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries" and p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
    # no two panels overlap on the grid
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))


@pytest.mark.grafana
def test_each_row_holds_its_components_metrics():
    dash, row, by_row = _dashboard(), None, {}
    for p in sorted(dash["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            row = p["title"]
            continue
        by_row.setdefault(row, set()).update(*(metric_names(t["expr"]) for t in p["targets"]))
    assert any(n.startswith("ray_flywheel_rollout_tokens") for n in by_row["Throughput"])
    assert any(n.startswith("ray_flywheel_learner_loss") for n in by_row["Learning"])
    assert any(n.startswith("ray_flywheel_learner_importance_ess") for n in by_row["Off-policyness"])
    assert any(n.startswith("ray_flywheel_replay_groups") for n in by_row["Replay"])
    assert any(n.startswith("ray_flywheel_weight_sync_send_seconds") for n in by_row["Weight sync"])


@pytest.mark.prometheus
def test_alert_rules_reference_only_exported_metrics():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "FlywheelLearnerStalled",
        "FlywheelRolloutWorkerDown",
        "FlywheelStalenessAboveBound",
        "FlywheelNaNLoss",
    }
    for r in rules:
        names = metric_names(r["expr"])
        assert names and names <= set(_exported()), (r["alert"], names - set(_exported()))
