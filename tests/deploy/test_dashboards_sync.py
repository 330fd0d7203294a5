"""The chart ships copies of deploy/grafana/*.json (Helm can't read outside the chart)."""
from __future__ import annotations


from ._chart import CHART, ROOT

SRC = ROOT / "deploy" / "grafana"
DST = CHART / "dashboards"


def test_chart_dashboards_match_deploy_grafana() -> None:
    src = {p.name: p.read_bytes() for p in SRC.glob("*.json")} if SRC.is_dir() else {}
    assert src, "deploy/grafana has no *.json dashboards"
    dst = {p.name: p.read_bytes() for p in DST.glob("*.json")}
    missing = sorted(set(src) - set(dst))
    extra = sorted(set(dst) - set(src))
    stale = sorted(n for n in set(src) & set(dst) if src[n] != dst[n])
    assert not (missing or extra or stale), (
        f"helm/dexserve/dashboards out of sync with deploy/grafana: missing={missing} extra={extra} "
        f"differ={stale}; fix: cp deploy/grafana/*.json helm/dexserve/dashboards/"
    )
