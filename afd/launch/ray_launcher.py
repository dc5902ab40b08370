"""Ray launcher: every rank a Ray actor in its instance's placement group, possibly on another
node. Ray only places and watches the ranks: the coordinator still drives them over its zmq
control plane and activations flow over the transport, never through Ray's object store."""

from __future__ import annotations

import dataclasses
import importlib
import os

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from afd.config import ConfigError, ModelConfig
from afd.engine.builder import EngineSettings
from afd.launch.local import DisaggregatedExecutor, rank_names, start_executor, worker_specs
from afd.launch.rank_process import RankProcess, worker_module
from afd.launch.ray_placement import (
    Instance,
    connect,
    coordinator_host,
    format_plan,
    plan_instances,
    release,
    reserve,
)
from afd.launch.worker_spec import WorkerSpec
from transport.base import Transport, register_transport


@register_transport("zmq-node")
def zmq_on_node_ip(name: str, **options: object) -> Transport:
    """The zmq transport bound to this node's IP instead of loopback, so that ranks on other
    nodes reach it; registered wherever this module is imported (the rank actors too)."""
    from transport.zmq_backend import ZmqTransport

    return ZmqTransport(name, host=ray.util.get_node_ip_address(), **options)


@register_transport("nccl-node")
def nccl_on_node_ip(name: str, **options: object) -> Transport:
    """The nccl transport advertising its rendezvous store at this node's IP instead of
    loopback, so that ranks on other nodes can join the lead's store."""
    from transport.nccl_backend import NcclTransport

    return NcclTransport(name, host=ray.util.get_node_ip_address(), **options)


def node_transport(transport: str, coordinator_address: str) -> str:
    """The transport ranks use: the node-IP variant once the coordinator is reachable beyond
    this machine (Ray with a cluster address), the given one on loopback."""
    if coordinator_address.startswith("tcp://127.0.0.1:"):
        return transport
    return f"{transport}-node"


class RankActor:
    """Hosts one rank: run() is the worker's main loop, in the actor's own process."""

    def where(self) -> dict[str, object]:
        ctx = ray.get_runtime_context()
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ctx.get_node_id(),
            "actor_id": ctx.get_actor_id(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def run(self, spec_json: str) -> int:
        spec = WorkerSpec.from_json(spec_json)
        try:
            return importlib.import_module(worker_module(spec)).main([spec_json])
        except SystemExit as e:  # a rank that said why in one line (WorkerSpec.session): an
            return int(e.code or 0)  # exit code, not Ray's "worker died" report with a trace


_RemoteRankActor = ray.remote(RankActor)

# On shutdown, ranks get this long to exit before their actors are killed. The coordinator is
# stopped once the shutdown timeout is spent, and Ray aborts a driver 3 s after its SIGTERM
# (the alarm of Ray's failure signal handler): the kills and the placement groups' removal
# must come well before that.
STOP_TIMEOUT_S = 0.5


class RayRank(RankProcess):
    def __init__(self, name: str, actor: ray.actor.ActorHandle, spec_json: str) -> None:
        self.name, self.actor = name, actor
        # actor calls run in order: where() answers before run() starts serving
        self.where_ref = actor.where.remote()
        self.run_ref = actor.run.remote(spec_json)
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None and ray.wait([self.run_ref], timeout=0)[0]:
            try:
                self.code = int(ray.get(self.run_ref) or 0)
            except Exception:  # the rank raised, or its actor (process, node) died
                self.code = 1
        return self.code

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def wait(self, timeout_s: float) -> bool:
        return bool(ray.wait([self.run_ref], timeout=timeout_s)[0])

    @property
    def where(self) -> str:
        if ray.wait([self.where_ref], timeout=0)[0]:
            try:
                w = ray.get(self.where_ref)
                return f"node {w['node_ip']}, pid {w['pid']}, actor {w['actor_id']}"
            except Exception:
                pass
        return f"Ray actor of rank {self.name}, not started"


class RaySpawner:
    """Spawns ranks into reserved placement groups; release() kills every actor it started
    (a finished run() leaves its actor alive) and frees the groups."""

    def __init__(self, plan: list[Instance], groups: list[PlacementGroup], device: str) -> None:
        self.device, self.groups = device, groups
        self.slots = {
            rank: (group, b, inst.bundles[b]["CPU"])
            for inst, group in zip(plan, groups, strict=True)
            for b, rank in enumerate(inst.ranks)
        }
        self.actors: list[ray.actor.ActorHandle] = []

    def actor(self, rank: str) -> ray.actor.ActorHandle:
        group, b, cpus = self.slots[rank]
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b)
        handle = _RemoteRankActor.options(
            name=f"afd-{rank}-{group.id.hex()[:8]}",
            num_cpus=cpus,
            num_gpus=1 if self.device == "cuda" else 0,
            scheduling_strategy=strategy,
            max_restarts=0,
        ).remote()
        self.actors.append(handle)
        return handle

    def __call__(self, spec: WorkerSpec) -> RankProcess:
        return RayRank(spec.name, self.actor(spec.name), spec.to_json())

    def release(self) -> None:
        for handle in self.actors:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors.clear()
        release(self.groups)


def check_settings(settings: EngineSettings) -> None:
    if settings.colocated:
        raise ConfigError(
            "--launcher ray runs attention and FFN as separate ranks; drop --colocated"
        )


def build_ray_disaggregated(
    settings: EngineSettings, cfg: ModelConfig
) -> tuple[DisaggregatedExecutor, int]:
    """Ray launcher: reserves one placement group per instance, then one actor per rank."""
    check_settings(settings)
    connect(settings.ray_address)
    plan = plan_instances(settings)
    spawner = RaySpawner(plan, reserve(plan), settings.device)
    attn, ffn = rank_names(settings)
    try:
        host = coordinator_host(settings.ray_address)
        executor = DisaggregatedExecutor(attn, ffn, host=host, stop_timeout_s=STOP_TIMEOUT_S)
    except BaseException:
        spawner.release()
        raise
    executor.on_shutdown = spawner.release
    # parent_pid 0: an actor's parent is a Ray worker, not us; Ray reaps it with our job
    # torch threads: the CPUs each bundle holds (1 unless the role resources ask for more)
    threads = int(min(cpus for _, _, cpus in spawner.slots.values()))
    specs = worker_specs(settings, cfg, executor.address, parent_pid=0, threads=max(1, threads))
    transport = node_transport(settings.transport, executor.address)
    specs = [dataclasses.replace(s, transport=transport) for s in specs]
    return start_executor(executor, specs, spawner)


def placement_report(settings: EngineSettings) -> str:
    """--dry-run: reserves the placement groups, asks a probe actor in every bundle where it
    landed, frees everything and returns the plan as text."""
    check_settings(settings)
    connect(settings.ray_address)
    plan = plan_instances(settings)
    spawner = RaySpawner(plan, reserve(plan), settings.device)
    try:
        refs = {rank: spawner.actor(rank).where.remote() for rank in spawner.slots}
        where = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    finally:
        spawner.release()
    return format_plan(plan, where)
