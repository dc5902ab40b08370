"""Ray placement plans and launch flags, without a cluster: bundles per instance with the
role's resources, which address the ranks reach the coordinator at, and flag errors."""

from __future__ import annotations

import argparse

import pytest

from afd.config import ConfigError
from afd.engine.builder import EngineSettings
from afd.launch.launch_options import launch_fields, parse_resources
from afd.launch.ray_placement import coordinator_host, plan_instances
from afd.launch.serve import add_engine_args


def test_one_group_per_instance_with_role_resources() -> None:
    settings = EngineSettings(
        model="unused", device="cuda", colocated=False, attn="2x2", ffn="1x4",
        attn_resources={"attn_node": 1.0}, ffn_resources={"ffn_node": 1.0},
    )  # fmt: skip
    plan = plan_instances(settings)
    assert [(i.role, i.index, i.ranks) for i in plan] == [
        ("attention", 0, ["a0", "a1"]),
        ("attention", 1, ["a2", "a3"]),
        ("FFN", 0, ["f0", "f1", "f2", "f3"]),
    ]
    assert plan[0].bundles == [{"CPU": 1.0, "GPU": 1.0, "attn_node": 1.0}] * 2
    assert plan[2].bundles == [{"CPU": 1.0, "GPU": 1.0, "ffn_node": 1.0}] * 4


def test_cpu_bundles() -> None:
    plan = plan_instances(EngineSettings(model="unused", colocated=False, attn="1x1", ffn="2x1"))
    assert [b for i in plan for b in i.bundles] == [{"CPU": 1.0}] * 3


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:1"])
def test_loopback_cluster_keeps_the_coordinator_on_loopback(address: str) -> None:
    assert coordinator_host(address) == "127.0.0.1"


@pytest.mark.parametrize("text", ["{", "[1]", '{"attn_node": 0}', '{"x": "a"}'])
def test_bad_resources_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--attn-resources"):
        parse_resources(text, "--attn-resources")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser.parse_args(list(argv))


def test_launcher_defaults_to_ray_with_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launch_fields(parse())["launcher"] == "local"
    assert launch_fields(parse("--ray-address", "10.0.0.1:6379"))["launcher"] == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert launch_fields(parse())["launcher"] == "ray"
    assert launch_fields(parse("--launcher", "local"))["launcher"] == "local"
    with pytest.raises(ConfigError, match="--colocated"):
        launch_fields(parse("--colocated"))


def test_role_resources_may_raise_the_cpus_per_rank() -> None:
    settings = EngineSettings(
        model="unused", colocated=False, attn="1x1", ffn="1x2", ffn_resources={"CPU": 4.0}
    )
    bundles = [b for i in plan_instances(settings) for b in i.bundles]
    assert bundles == [{"CPU": 1.0}, {"CPU": 4.0}, {"CPU": 4.0}]


def test_ranks_use_node_ip_transports_beyond_loopback() -> None:
    from afd.launch.ray_launcher import node_transport

    assert node_transport("zmq", "tcp://127.0.0.1:5555") == "zmq"
    assert node_transport("nccl", "tcp://127.0.0.1:5555") == "nccl"
    assert node_transport("zmq", "tcp://10.0.0.7:5555") == "zmq-node"
    assert node_transport("nccl", "tcp://10.0.0.7:5555") == "nccl-node"


def test_nccl_node_transport_advertises_the_node_ip(monkeypatch) -> None:
    """Across nodes the other ranks join the lead's rendezvous store at the address it
    advertises: the node's IP (a stand-in here), not loopback."""
    import ray

    import afd.launch.ray_launcher  # noqa: F401 - registers the node-IP transports
    from transport.base import create_transport

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    transport = create_transport("nccl-node", "a0", device="cpu")
    try:
        assert transport.address().rsplit(":", 1)[0] == "127.0.0.2"
    finally:
        transport.close()
