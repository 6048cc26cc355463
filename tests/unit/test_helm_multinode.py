"""The Helm chart's multi-node pools (LeaderWorkerSet groups) and KEDA autoscaling."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pdserve import metrics
from tests.unit.helm_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    Manifest,
    cached_kubernetes_schemas,
    container,
    flags,
    helm,
    manifests,
    one,
    pod_template,
    profile_values,
    render_raw,
    selects,
)

__all__ = ["cached_kubernetes_schemas"]  # the autouse fixture, applied here too

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
