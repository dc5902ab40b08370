"""deploy/: the Ray cluster config, the KubeRay manifest and the Dockerfile parse and carry
what a 2 attention + 2 FFN node (8 GPUs each) launch needs; the afd-serve commands they and
the README run are accepted by afd-serve's own parser."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from afd.launch.launch_options import launch_fields
from afd.launch.serve import add_engine_args
from afd.server.api_server import add_server_args

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROLES = {"attn": "attn_node", "ffn": "ffn_node"}


def parse_serve(command: str) -> argparse.Namespace:
    """Parses an `afd-serve ...` shell command with the real flags."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "afd-serve", command
    parser = argparse.ArgumentParser(prog="afd-serve")
    add_engine_args(parser)
    add_server_args(parser)
    return parser.parse_args(words[1:])


def check_multi_node(args: argparse.Namespace) -> None:
    assert (args.attn, args.ffn, args.device) == ("2x8", "2x8", "cuda")
    fields = launch_fields(args)
    assert fields["launcher"] == "ray"
    assert fields["attn_resources"] == {"attn_node": 1.0}
    assert fields["ffn_resources"] == {"ffn_node": 1.0}


def test_ray_cluster_config() -> None:
    cfg = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert cfg["cluster_name"] and cfg["provider"]["type"] and cfg["docker"]["image"]
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0  # no rank on the head
    for resource in ROLES.values():
        [node] = [t for t in types.values() if resource in t.get("resources", {})]
        assert node["min_workers"] == node["max_workers"] == 2
        assert node["resources"]["GPU"] == node["resources"][resource] == 8
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def kuberay_docs() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()))


def test_kuberay_cluster() -> None:
    [cluster] = [d for d in kuberay_docs() if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [container] = head["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "$KUBERAY_GEN_RAY_START_CMD" in script
    check_multi_node(parse_serve(script[script.index("afd-serve") :]))
    assert {"containerPort": 8000, "name": "openai"} in container["ports"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    for name, resource in ROLES.items():
        group = groups[name]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
        params = group["rayStartParams"]
        assert params["num-gpus"] == "8"
        assert json.loads(json.loads(params["resources"])) == {resource: 8}
        [worker] = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_kuberay_service_targets_the_head() -> None:
    [service] = [d for d in kuberay_docs() if d["kind"] == "Service"]
    assert service["spec"]["selector"] == {"ray.io/cluster": "afd", "ray.io/node-type": "head"}
    assert service["spec"]["ports"][0]["targetPort"] == 8000


def test_dockerfile_installs_afd_on_cuda() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    for package in ("afd", "attn_worker", "ffn_worker", "transport"):
        assert re.search(rf"^COPY {package} ", text, re.M), package
    assert 'pip install ".[ray]"' in text


@pytest.mark.parametrize("dry_run", [True, False])
def test_readme_commands_parse(dry_run: bool) -> None:
    text = (DEPLOY / "README.md").read_text()
    commands = re.findall(r"^afd-serve .*?(?<!\\)$", text, re.M | re.S)
    [command] = [c for c in commands if ("--dry-run" in c) == dry_run]
    args = parse_serve(command)
    check_multi_node(args)
    assert args.dry_run == dry_run
