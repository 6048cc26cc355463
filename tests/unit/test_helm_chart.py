"""The Helm chart renders, validates against Kubernetes' schemas and is wired correctly.

Rendering uses helm-python-sdk (Helm's own Go library, no helm binary or cluster);
manifests are checked with kubernetes-validate. Profiles are the chart's ci/*-values.yaml.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from pdserve import metrics  # noqa: E402

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
def _cached_kubernetes_schemas() -> Any:
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


# Multi-node pools (LeaderWorkerSet groups) and KEDA autoscaling.
MULTI = "multinode-keda"


def follower(lws: Manifest) -> Manifest:
    template = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    (only,) = template["spec"]["containers"]
    return dict(only)


def gpus(c: Manifest) -> int:
    return int(c["resources"]["limits"]["nvidia.com/gpu"])


def test_multi_node_pools_render_one_leader_worker_set_group_per_replica() -> None:
    values = profile_values(MULTI)
    assert values is not None
    assert not [w for w in manifests(MULTI) if w["kind"] in {"Deployment", "StatefulSet"}][1:]
    for role in ("prefill", "decode"):
        pool = values[role]
        lws = one(MULTI, "LeaderWorkerSet", f"-{role}")
        size = pool["multiNode"]["nodesPerReplica"]
        assert lws["spec"]["leaderWorkerTemplate"]["size"] == size
        assert "replicas" not in lws["spec"], "KEDA owns the replica count"
        ranks = pool["tensorParallelSize"] * pool.get("pipelineParallelSize", 1)
        leader, other = container(lws), follower(lws)
        # Every node of a group holds the same share of the engine's ranks.
        assert gpus(leader) == gpus(other) == ranks // size
        args = flags(leader)
        assert args["--nnodes"] == [str(size)]
        assert args["--tensor-parallel-size"] == [str(pool["tensorParallelSize"])]
        assert args["--distributed-executor-backend"] == [pool["multiNode"]["backend"]]
    # mp: the leader is the master at its LWS address; followers are headless vLLM nodes.
    decode = one(MULTI, "LeaderWorkerSet", "-decode")
    leader, other = flags(container(decode)), follower(decode)
    assert container(decode)["command"] == ["pdserve"]
    assert leader["--master-addr"] == ["$(LWS_LEADER_ADDRESS)"]
    assert other["command"] == ["vllm"] and other["args"][:3] == [
        "serve",
        "/models/model",
        "--headless",
    ]
    fargs = flags(other)
    assert fargs["--node-rank"] == ["$(LWS_WORKER_INDEX)"]
    for flag in (
        "--nnodes",
        "--master-addr",
        "--master-port",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--max-model-len",
        "--dtype",
    ):
        assert fargs[flag] == leader[flag], flag
    # ray: a Ray head on the leader (then `pdserve worker`), Ray nodes joining it.
    prefill = one(MULTI, "LeaderWorkerSet", "-prefill")
    command = container(prefill)["command"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    port = values["prefill"]["multiNode"].get("port", defaults["prefill"]["multiNode"]["port"])
    assert command[:2] == ["/bin/sh", "-c"] and f"ray start --head --port={port}" in command[2]
    assert 'exec pdserve "$@"' in command[2] and flags(container(prefill))["--role"] == ["prefill"]
    assert "--master-addr" not in flags(container(prefill))
    assert follower(prefill)["command"] == ["ray"]
    assert follower(prefill)["args"] == [
        "start",
        f"--address=$(LWS_LEADER_ADDRESS):{port}",
        "--block",
    ]


def test_vllm_parses_the_follower_command_line() -> None:
    """The follower's flags are vLLM's own; their node layout passes vLLM's checks."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = arg_utils.EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = follower(one(MULTI, "LeaderWorkerSet", "-decode"))["args"]
    assert args[0] == "serve" and args[2] == "--headless"
    argv = ["--model", args[1], *(a.replace("$(LWS_WORKER_INDEX)", "1") for a in args[3:])]
    argv = [
        a.replace("$(LWS_LEADER_ADDRESS)", "leader").replace("$(GROUP_INDEX)", "0") for a in argv
    ]
    engine = arg_utils.EngineArgs.from_cli_args(parser.parse_args(argv))
    assert (engine.nnodes, engine.node_rank, engine.master_addr) == (2, 1, "leader")
    assert engine.tensor_parallel_size * engine.pipeline_parallel_size == 16
    assert engine.kv_transfer_config is not None
    assert engine.kv_transfer_config.kv_connector == "NixlConnector"


def test_follower_ranks_get_the_leaders_nixl_engine_config() -> None:
    """The follower's --kv-transfer-config is what the leader's engine gets from
    NixlTransport.engine_kv_config, with the leader's pod name as engine id."""
    import json

    from kv_transfer.nixl import NixlTransport
    from pdserve.config import Role

    lws = one(MULTI, "LeaderWorkerSet", "-decode")
    config = json.loads(flags(follower(lws))["--kv-transfer-config"][0])
    leader_pod = f"{lws['metadata']['name']}-3"  # LWS names group 3's leader <lws>-3
    config["engine_id"] = config["engine_id"].replace("$(GROUP_INDEX)", "3")
    lease = float(flags(container(lws))["--kv-lease-s"][0])
    assert config == NixlTransport(lease).engine_kv_config(Role.DECODE, leader_pod)
    env = {e["name"]: e for e in follower(lws)["env"]}
    label = env["GROUP_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert label == "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["value"] == "$(POD_IP)"
    # pdserve's vLLM fixes (e.g. NIXL reads by a PP decode engine) also on these ranks.
    from pdserve.kv_transfer.vllm_patches import ENABLE_ENV

    assert env[ENABLE_ENV]["value"] == "1"


def test_router_discovers_only_group_leaders() -> None:
    config = yaml.safe_load(one(MULTI, "ConfigMap", "-router")["data"]["router.yaml"])
    for role in ("prefill", "decode"):
        selector = config["discovery"]["pools"][role]["labelSelector"]
        wanted = dict(kv.split("=") for kv in selector.split(","))
        lws = one(MULTI, "LeaderWorkerSet", f"-{role}")
        workers = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
        assert selects(wanted, pod_template(lws)["metadata"]["labels"])
        assert not selects(wanted, workers)
        # The pool's Service still covers the followers: its name is LWS's subdomain.
        service = one(MULTI, "Service", f"-{role}")
        assert service["metadata"]["name"] == lws["metadata"]["name"]
        assert selects(service["spec"]["selector"], workers)


def test_static_discovery_names_multi_node_leaders() -> None:
    docs = render_raw(
        {"decode": {"replicas": 2, "tensorParallelSize": 4, "multiNode": {"enabled": True}}}
    )
    found = [d for p, t in docs.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    (lws,) = [d for d in found if d["kind"] == "LeaderWorkerSet"]
    assert lws["spec"]["replicas"] == 2
    (router,) = [d for d in found if d["kind"] == "Deployment"]
    name = lws["metadata"]["name"]
    # LWS leader pods are <lws>-<group> with subdomain <lws>, like StatefulSet pods.
    assert flags(container(router))["--decode"] == [
        f"{name}-{i}.{name}.{NAMESPACE}.svc.cluster.local:50100" for i in range(2)
    ]


def test_hpa_scales_a_multi_node_pool_by_groups() -> None:
    docs = render_raw(
        {
            "router": {"discovery": "kubernetes"},
            "decode": {
                "tensorParallelSize": 4,
                "multiNode": {"enabled": True},
                "autoscaling": {"enabled": True},
            },
        }
    )
    (hpa,) = [d for d in yaml.safe_load_all(docs["pdserve/templates/decode-hpa.yaml"]) if d]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": f"{RELEASE}-pdserve-decode",
    }


def test_keda_triggers_query_the_chart_metrics() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not manifests(MULTI, "HorizontalPodAutoscaler"), "KEDA replaces the HPA"
    names = {v for v in vars(metrics).values() if isinstance(v, str)}
    for role in ("prefill", "decode"):
        scaled = one(MULTI, "ScaledObject", f"-{role}")
        spec = scaled["spec"]
        assert (
            spec["scaleTargetRef"]["name"]
            == one(MULTI, "LeaderWorkerSet", f"-{role}")["metadata"]["name"]
        )
        triggers = spec["triggers"]
        assert [t["name"] for t in triggers] == [
            t["name"] for t in values[role]["keda"]["triggers"]
        ]
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "prometheus"
            assert meta["serverAddress"] == values["keda"]["prometheusAddress"]
            assert f'namespace="{NAMESPACE}"' in meta["query"], "the query template was rendered"
            used = {
                n
                for n in names
                if isinstance(n, str) and n.startswith("pdserve_") and n in meta["query"]
            }
            assert used, meta["query"]
            float(meta["threshold"])


@pytest.mark.parametrize(
    "values",
    [
        {"decode": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}},
        {"decode": {"multiNode": {"enabled": True, "nodesPerReplica": 1}}},
        {"decode": {"multiNode": {"backend": "slurm"}}},
        {"prefill": {"keda": {"triggers": []}}},
        {
            "prefill": {
                "keda": {
                    "triggers": [
                        {"name": "x", "query": "up", "threshold": "high", "metricType": "Value"}
                    ]
                }
            }
        },
        {"keda": {"prometheusAddress": "prometheus:9090"}},
    ],
    ids=["hpa-and-keda", "one-node", "unknown-backend", "no-triggers", "bad-threshold", "address"],
)
def test_schema_rejects_bad_multi_node_and_keda_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="schema"):
        render_raw(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"decode": {"keda": {"enabled": True}}}, "decode.keda needs router.discovery"),
        ({"decode": {"tensorParallelSize": 3, "multiNode": {"enabled": True}}}, "must divide"),
        (
            {
                "workers": {"kvTransport": "grpc"},
                "decode": {"tensorParallelSize": 2, "multiNode": {"enabled": True}},
            },
            "needs workers.kvTransport=nixl",
        ),
    ],
)
def test_render_refuses_unworkable_multi_node_and_keda(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render_raw(values)
