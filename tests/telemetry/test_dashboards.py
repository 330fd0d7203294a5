"""The Grafana dashboards: valid JSON, unique panel ids, data sources through
uid variables, and PromQL that only names series dexserve.telemetry.metrics defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dexserve.telemetry.metrics import series_names

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "inf", "nan",
}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))       # panels of collapsed rows
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: strip strings, Grafana variables,
    label matchers, ranges and grouping clauses; drop functions and keywords."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", " ", s)       # numbers and durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if s[m.end():].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_there_are_dashboards():
    assert {p.name for p in DASHBOARDS} >= {"dexserve-fleet.json", "dexserve-request.json"}


def test_metric_name_parser():
    expr = ('histogram_quantile(0.99, sum by (le, part) (rate(dex_worker_round_seconds_bucket{part="a b"}[$__rate_interval])))'
            ' / ignoring(boundary) group_left sum(x_total offset 5m) and on(instance) up')
    assert metric_names(expr) == {"dex_worker_round_seconds_bucket", "x_total", "up"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_and_consistent(path: Path):
    d = json.loads(path.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["prometheus"]["type"] == "datasource" and variables["prometheus"]["query"] == "prometheus"
    assert variables["tempo"]["type"] == "datasource" and variables["tempo"]["query"] == "tempo"
    known = series_names()
    for p in panels(d):
        if p["type"] in ("row", "text"):
            continue
        refs = [p["datasource"]] + [t["datasource"] for t in p.get("targets", [])]
        for ref in refs:
            assert ref["uid"] == "${%s}" % ref["type"], f"{p['title']}: data source not by uid variable: {ref}"
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            if t["datasource"]["type"] != "prometheus":
                continue
            names = metric_names(t["expr"])
            assert names, f"{p['title']}: no metric in {t['expr']!r}"
            assert names <= known, f"{p['title']}: unknown series {sorted(names - known)} in {t['expr']!r}"


def test_fleet_dashboard_covers_the_issue():
    d = json.loads((GRAFANA / "dexserve-fleet.json").read_text())
    exprs = " ".join(t["expr"] for p in panels(d) for t in p.get("targets", []))
    for series in ("dex_worker_generated_tokens_total", "dex_gateway_time_to_first_token_seconds_bucket",
                   "dex_worker_inter_token_latency_seconds_bucket", "dex_queue_depth_messages", "dex_queue_lag_messages",
                   "dex_worker_queue_wait_seconds_bucket", "dex_worker_commits_total", "dex_worker_request_rounds_total",
                   "dex_gateway_active_requests", "dex_workers", "dex_gateway_errors_total",
                   "dex_worker_lattice_live_nodes", "dex_worker_wasted_node_segments_total"):
        assert series in exprs, series
    assert 'boundary="fallback"' in exprs
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


def test_request_dashboard_finds_a_trace_by_request_id():
    d = json.loads((GRAFANA / "dexserve-request.json").read_text())
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"request_id", "trace_id"} <= variables
    by_type = {p["type"]: p for p in panels(d)}
    trace_panel = by_type["traces"]
    assert trace_panel["datasource"]["type"] == "tempo"
    queries = [t["query"] for p in panels(d) if p.get("datasource", {}).get("type") == "tempo" for t in p["targets"]]
    assert any('{ span.dex.request_id = "$request_id" }' in q for q in queries)
    assert trace_panel["targets"][0]["query"] == "$trace_id"


def test_datasource_provisioning_example():
    import yaml
    doc = yaml.safe_load((GRAFANA / "datasources.yaml").read_text())
    types = {ds["type"]: ds for ds in doc["datasources"]}
    assert types["prometheus"]["uid"] == "prometheus" and types["tempo"]["uid"] == "tempo"
