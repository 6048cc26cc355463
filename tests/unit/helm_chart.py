"""Rendering the Helm chart in tests: helm-python-sdk (Helm's own Go library, no helm
binary or cluster) and kubernetes-validate. Profiles are the chart's ci/*-values.yaml.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/pdserve"
PROFILES = [
    "default",
    *sorted(p.name.removesuffix("-values.yaml") for p in CHART.glob("ci/*.yaml")),
]
RELEASE, NAMESPACE = "demo", "llm"
# The chart's oldest supported Kubernetes minor (Chart.yaml kubeVersion) and the newest
# that kubernetes-validate knows.
KUBE_VERSIONS = ("1.27", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
# Kinds from CRDs (kubernetes-validate has no schema for them) and their API versions.
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "LeaderWorkerSet"}
Manifest = dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def cached_kubernetes_schemas() -> Any:
    """kubernetes-validate re-reads its schema files on every call; read each once."""
    utils = kubernetes_validate.utils
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "all_versions", functools.cache(utils.all_versions))
        patch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield


def profile_values(profile: str) -> dict[str, Any] | None:
    if profile == "default":
        return None
    return yaml.safe_load((CHART / f"ci/{profile}-values.yaml").read_text())


@functools.cache
def chart() -> Any:
    return helm.Chart.load(CHART)


def render_raw(values: dict[str, Any] | None) -> dict[str, str]:
    return chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def rendered(profile: str) -> tuple[tuple[str, tuple[Manifest, ...]], ...]:
    """(template path, its manifests) for every YAML template of a profile."""
    out = []
    for path, text in sorted(render_raw(profile_values(profile)).items()):
        if path.endswith(".yaml"):
            out.append((path, tuple(d for d in yaml.safe_load_all(text) if d)))
    return tuple(out)


def manifests(profile: str, kind: str | None = None) -> list[Manifest]:
    docs = [doc for _, docs in rendered(profile) for doc in docs]
    return [d for d in docs if kind is None or d["kind"] == kind]


def one(profile: str, kind: str, name_suffix: str) -> Manifest:
    found = [d for d in manifests(profile, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{profile}: {len(found)} {kind} named *{name_suffix}"
    return found[0]


def flags(container: Manifest) -> dict[str, list[str]]:
    """--name=value arguments of a container, by name (repeatable flags keep all values)."""
    out: dict[str, list[str]] = {}
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def pod_template(workload: Manifest) -> Manifest:
    """The pod template of a workload; of a LeaderWorkerSet, its leader's."""
    if workload["kind"] == "LeaderWorkerSet":
        return dict(workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    return dict(workload["spec"]["template"])


def container(workload: Manifest) -> Manifest:
    (only,) = pod_template(workload)["spec"]["containers"]
    return only


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
