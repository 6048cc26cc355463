"""Panel and PromQL helpers for the pdserve Grafana dashboard (build_dashboard.py).

Every query carries the dashboard's `$namespace` filter and `$__rate_interval`; every panel
reads the `${datasource}` variable.
"""

from __future__ import annotations

from typing import Any

# grafana-foundation-sdk is needed to regenerate the JSON, not to run pdserve: type-checking
# must also pass where it is not installed.
from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries  # type: ignore[import-not-found, unused-ignore]
from grafana_foundation_sdk.models import common as cm  # type: ignore[import-not-found, unused-ignore]
from grafana_foundation_sdk.models import dashboard as dm  # type: ignore[import-not-found, unused-ignore]

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"
NS = 'namespace=~"$namespace"'
QUANTILES = (0.5, 0.9, 0.99)


def sel(*matchers: str) -> str:
    """A label selector that always carries the dashboard's namespace filter."""
    return "{" + ", ".join((NS, *matchers)) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{sel(*matchers)}{RATE})"


def quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    """histogram_quantile over a pdserve/vLLM histogram's buckets."""
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', *matchers)}))"


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def series(
    title: str, unit: str, targets: list[prometheus.Dataquery], description: str = "", w: int = 8
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(8)
        .fill_opacity(10)
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .calcs([])
        )
        .tooltip(
            common.VizTooltipOptions()
            .mode(cm.TooltipDisplayMode.MULTI)
            .sort(cm.SortOrder.DESCENDING)
        )
    )
    for ref, target in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def percentiles(title: str, histogram: str, *matchers: str, description: str = "") -> Any:
    targets = [query(quantile(q, histogram, *matchers), f"p{round(q * 100)}") for q in QUANTILES]
    return series(title, "s", targets, description)


def single(title: str, unit: str, expr: str, description: str = "") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(query(expr, title).ref_id("A"))
    )
