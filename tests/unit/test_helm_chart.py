"""The Helm chart renders, validates against Kubernetes' schemas and is wired correctly
(single-node pools; multi-node pools and KEDA: test_helm_multinode.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve import metrics
from tests.unit.helm_chart import (
    CHART,
    CUSTOM_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    PROFILES,
    RELEASE,
    ROOT,
    WORKLOAD_KINDS,
    cached_kubernetes_schemas,
    container,
    flags,
    helm,
    kubernetes_validate,
    manifests,
    one,
    pod_template,
    profile_values,
    render_raw,
    rendered,
    selects,
)

__all__ = ["cached_kubernetes_schemas"]  # the autouse fixture, applied here too


@pytest.mark.parametrize("profile", PROFILES)
def test_chart_lints_cleanly(profile: str) -> None:
    values = profile_values(profile)
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("profile", PROFILES)
def test_manifests_are_valid_kubernetes_objects(profile: str) -> None:
    for doc in manifests(profile):
        if doc["kind"] in CUSTOM_KINDS:
            # CRDs: kubernetes-validate has no schema; check the envelope, the rest below.
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]] and doc["spec"]
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_one_resource_per_template_file(profile: str) -> None:
    for path, docs in rendered(profile):
        assert len(docs) <= 1, f"{path} renders {len(docs)} resources"
    names = Counter((d["kind"], d["metadata"]["name"]) for d in manifests(profile))
    assert all(n == 1 for n in names.values()), names


def test_every_template_renders_in_some_profile() -> None:
    used = {path for p in PROFILES for path, docs in rendered(p) if docs}
    templates = {
        f"pdserve/{p.relative_to(CHART)}"
        for p in CHART.glob("templates/**/*.yaml")
        if not p.name.startswith("_")
    }
    assert templates - used == set()


@pytest.mark.parametrize("profile", PROFILES)
def test_selectors_match_their_pods(profile: str) -> None:
    workloads = [d for d in manifests(profile) if d["kind"] in WORKLOAD_KINDS]
    pod_labels = {w["metadata"]["name"]: pod_template(w)["metadata"]["labels"] for w in workloads}
    for w in workloads:
        if w["kind"] == "LeaderWorkerSet":
            continue  # LWS selects its pods itself (by its own labels)
        assert selects(w["spec"]["selector"]["matchLabels"], pod_labels[w["metadata"]["name"]])
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in manifests(profile, kind):
            spec = doc["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            matched = [n for n, labels in pod_labels.items() if selects(selector, labels)]
            assert matched == [doc["metadata"]["name"]], f"{kind} {doc['metadata']['name']}"
    scalers = manifests(profile, "HorizontalPodAutoscaler") + manifests(profile, "ScaledObject")
    for hpa in scalers:
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in {
            (w["kind"], w["metadata"]["name"]) for w in workloads
        }


@pytest.mark.parametrize("profile", PROFILES)
def test_ports_and_probes_are_wired(profile: str) -> None:
    router = container(one(profile, "Deployment", "-router"))
    args = flags(router)
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert args["--http-port"] == [str(ports["http"])]
    assert args["--grpc-port"] == [str(ports["grpc"])]
    assert args["--http-host"] == args["--grpc-host"] == ["0.0.0.0"]
    service = one(profile, "Service", "-router")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "grpc": "grpc",
    }
    assert router["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert router["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for role in ("prefill", "decode"):
        workload = next(
            w
            for w in manifests(profile)
            if w["kind"] in WORKLOAD_KINDS and w["metadata"]["name"].endswith(f"-{role}")
        )
        worker = container(workload)
        wargs = flags(worker)
        grpc_port = int(wargs["--port"][0])
        assert wargs["--role"] == [role] and wargs["--host"] == ["$(POD_IP)"]
        assert {p["name"]: p["containerPort"] for p in worker["ports"]}["grpc"] == grpc_port
        # With mTLS the probes use the plaintext health-only port instead.
        probe_port = int(wargs.get("--health-port", [grpc_port])[0])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["grpc"] == {"port": probe_port}, probe
        sleep = int(worker["lifecycle"]["preStop"]["exec"]["command"][1])
        grace = pod_template(workload)["spec"]["terminationGracePeriodSeconds"]
        assert grace >= sleep + 30, "grace must cover preStop and the worker's 30 s drain"
        svc = one(profile, "Service", f"-{role}")
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == grpc_port


@pytest.mark.parametrize("profile", PROFILES)
def test_command_lines_parse_with_the_pdserve_cli(profile: str) -> None:
    """Every flag the chart passes exists in `pdserve worker` / `pdserve router`."""
    typer = pytest.importorskip("typer")
    from pdserve.cli import app

    commands = typer.main.get_command(app).commands
    for workload in manifests(profile):
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        args = [a.replace("$(POD_IP)", "10.0.0.7") for a in container(workload)["args"]]
        params = commands[args[0]].make_context(args[0], args[1:]).params
        if args[0] == "worker":
            assert params["host"] == "10.0.0.7"
        elif params["discovery"] == "kubernetes":
            mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
            assert str(params["config_file"]) == mounts["config"]


@pytest.mark.parametrize("profile", PROFILES)
def test_router_config_parses_into_discovery_config(profile: str, tmp_path: Path) -> None:
    """router.yaml from the ConfigMap reads as the router reads its --config file, and
    names the namespace, port and pods of each pool."""
    from pdserve.config import DiscoveryMode, Role
    from pdserve.router.cli import discovery_from_config

    path = tmp_path / "router.yaml"
    path.write_text(one(profile, "ConfigMap", "-router")["data"]["router.yaml"])
    config = discovery_from_config(None, path)
    router_flags = flags(container(one(profile, "Deployment", "-router")))
    assert config.mode == router_flags.get("--discovery", [DiscoveryMode.STATIC])[0]
    assert config.namespace == NAMESPACE and set(config.selectors) == {Role.PREFILL, Role.DECODE}
    workloads = [w for w in manifests(profile) if w["kind"] in WORKLOAD_KINDS]
    for role, selector in config.selectors.items():
        wanted = dict(term.split("=") for term in selector.split(","))
        (chosen,) = [w for w in workloads if selects(wanted, pod_template(w)["metadata"]["labels"])]
        assert chosen["metadata"]["name"].endswith(f"-{role}")
        assert config.worker_port == int(flags(container(chosen))["--port"][0])


def test_static_discovery_names_every_worker_pod() -> None:
    profile = "tp2-pp2"
    router = flags(container(one(profile, "Deployment", "-router")))
    for role, replicas in (("prefill", 1), ("decode", 3)):
        sts = one(profile, "StatefulSet", f"-{role}")
        name, port = sts["metadata"]["name"], flags(container(sts))["--port"][0]
        assert sts["spec"]["replicas"] == replicas and sts["spec"]["serviceName"] == name
        assert one(profile, "Service", f"-{role}")["spec"]["clusterIP"] == "None"
        expected = [
            f"{name}-{i}.{name}.{NAMESPACE}.svc.cluster.local:{port}" for i in range(replicas)
        ]
        assert router[f"--{role}"] == expected
    assert not manifests(profile, "Role") and not manifests(profile, "HorizontalPodAutoscaler")


def test_parallelism_sets_flags_and_gpu_requests() -> None:
    for role, tp, pp in (("prefill", 2, 1), ("decode", 2, 2)):
        worker = container(one("tp2-pp2", "StatefulSet", f"-{role}"))
        args = flags(worker)
        assert args["--tensor-parallel-size"] == [str(tp)]
        assert args["--pipeline-parallel-size"] == [str(pp)]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == tp * pp
    cpu_worker = container(one("cpu", "StatefulSet", "-decode"))
    assert "nvidia.com/gpu" not in cpu_worker["resources"].get("limits", {})
    assert cpu_worker["image"].endswith("-cpu")


def test_autoscaled_pools_use_kubernetes_discovery() -> None:
    profile = "scale-hpa"
    for role, low in (("prefill", 3), ("decode", 5)):
        deployment = one(profile, "Deployment", f"-{role}")
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        hpa = one(profile, "HorizontalPodAutoscaler", f"-{role}")
        assert hpa["spec"]["minReplicas"] == low
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in vars(metrics).values()
    router = one(profile, "Deployment", "-router")
    assert "--prefill" not in flags(container(router))
    assert router["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    (role,) = manifests(profile, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    (binding,) = manifests(profile, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert (
        binding["subjects"][0]["name"] == router["spec"]["template"]["spec"]["serviceAccountName"]
    )
    config = yaml.safe_load(one(profile, "ConfigMap", "-router")["data"]["router.yaml"])
    selector = config["discovery"]["pools"]["decode"]["labelSelector"]
    pod_labels = one(profile, "Deployment", "-decode")["spec"]["template"]["metadata"]["labels"]
    assert selects(dict(kv.split("=") for kv in selector.split(",")), pod_labels)


def test_tls_secret_is_mounted_everywhere() -> None:
    for doc in manifests("tls"):
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "pdserve-tls"
        mounts = {m["name"]: m for m in container(doc)["volumeMounts"]}
        assert mounts["tls"]["readOnly"] is True
    assert all("tls" not in str(d) for d in manifests("default") if d["kind"] in WORKLOAD_KINDS)


def test_tls_files_reach_the_processes_and_probes_use_the_health_port() -> None:
    """With tls.enabled every pdserve process gets the mounted files as --tls-* flags, and
    worker probes move to the plaintext health-only port (the kubelet has no client cert)."""
    for doc in manifests("tls"):
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        c = container(doc)
        f = flags(c)
        assert f["--tls-cert"] == ["/etc/pdserve/tls/tls.crt"]
        assert f["--tls-key"] == ["/etc/pdserve/tls/tls.key"]
        assert f["--tls-ca"] == ["/etc/pdserve/tls/ca.crt"]
        assert f["--tls-server-name"] == ["pdserve-workers.llm.svc"]
        if c["args"][0] == "worker":
            (health_port,) = f["--health-port"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["health"] == int(health_port) != ports["grpc"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == ports["health"]
    for doc in manifests("default"):
        if doc["kind"] in WORKLOAD_KINDS:
            assert not any(a.startswith(("--tls", "--health-port")) for a in container(doc)["args"])


def test_monitoring_and_policy_can_be_turned_off() -> None:
    kinds = {d["kind"] for d in manifests("monitoring-off")}
    assert not kinds & {
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ServiceAccount",
        "Pod",
    }
    assert [c["metadata"]["name"] for c in manifests("monitoring-off", "ConfigMap")] == [
        f"{RELEASE}-pdserve-router"
    ]


def test_monitoring_resources() -> None:
    monitor = one("default", "ServiceMonitor", "pdserve")
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    services = manifests("default", "Service")
    named = {p["name"] for s in services for p in s["spec"]["ports"]}
    assert ports <= named and all(
        selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        for s in services
    )
    worker_endpoint = next(e for e in monitor["spec"]["endpoints"] if e["port"] == "metrics")
    assert worker_endpoint["relabelings"][0]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_pdserve_io_role"
    ]
    rule = one("default", "PrometheusRule", "pdserve")
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    custom = render_raw({"monitoring": {"runbookBaseUrl": "https://wiki.example/pdserve.md"}})
    assert (
        "https://wiki.example/pdserve.md#pdservehigherrorrate"
        in custom["pdserve/templates/prometheusrule.yaml"]
    )
    dashboard = one("default", "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["pdserve.json"] == (
        ROOT / "deploy/grafana/pdserve.json"
    ).read_text().rstrip("\n")


def test_network_policy_admits_only_router_workers_and_metrics() -> None:
    policy = one("default", "NetworkPolicy", "-workers")
    selector = policy["spec"]["podSelector"]
    assert selector["matchExpressions"][0]["values"] == ["prefill", "decode"]
    router_rule, peer_rule, metrics_rule = policy["spec"]["ingress"]
    assert (
        router_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "router"
    )
    assert router_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert peer_rule["from"][0]["podSelector"] == selector and "ports" not in peer_rule
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_long_release_names_keep_components_apart() -> None:
    out = render_raw({"fullnameOverride": "x" * 70})
    names = Counter(
        (doc["kind"], doc["metadata"]["name"])
        for path, text in out.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    )
    assert all(n == 1 for n in names.values()), names
    assert all(len(name) <= 52 for kind, name in names if kind in WORKLOAD_KINDS)


@pytest.mark.parametrize(
    "values",
    [
        {"decode": {"replicas": 0}},
        {"router": {"discovery": "dns"}},
        {"prefill": {"tensorParallelSize": "2"}},
        {"image": {"flavor": "rocm"}},
        {"workers": {"grpcPort": 70000}},
        {"decod": {"replicas": 2}},
    ],
    ids=["zero-replicas", "unknown-discovery", "tp-as-string", "unknown-flavor", "port", "typo"],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="schema"):
        render_raw(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"decode": {"autoscaling": {"enabled": True}}}, "needs router.discovery=kubernetes"),
        ({"prefill": {"pipelineParallelSize": 2}}, "pipelineParallelSize > 1"),
        ({"tls": {"enabled": True}}, "needs tls.secretName"),
    ],
)
def test_render_refuses_unworkable_combinations(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render_raw(values)
