"""Where ranks go on a Ray cluster: one placement group per instance (G bundles, STRICT_PACK so
an instance stays on one node, with the role's custom resources), and the --dry-run report."""

from __future__ import annotations

import atexit
import ipaddress
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from afd import envs
from afd.config import ConfigError
from afd.engine.builder import EngineSettings, parse_roles
from afd.launch.local import rank_names

NOTICE_AFTER_S = 10.0
REACH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Instance:
    role: str  # "attention" or "FFN"
    index: int
    ranks: list[str]
    bundles: list[dict[str, float]]

    def __str__(self) -> str:
        return f"{self.role} instance {self.index}"


def connect(address: str | None) -> None:
    """Joins the cluster at `address` once per process; with None, ray.init itself reads
    RAY_ADDRESS (see envs.ray_address) or starts a local cluster."""
    if not ray.is_initialized():
        _check_reachable(address or envs.ray_address())
        try:
            ray.init(address=address, namespace="afd", log_to_driver=True)
        except ConnectionError as e:  # something answered there, but not a Ray head
            raise ConfigError(f"{_flag(address)}: {e}") from None
        # at exit, leave the cluster before Ray's own hook does: that one first sleeps 0.5 s
        # for late log lines, on top of every shutdown. Hooks registered later (the executor's,
        # which stops the ranks) still run before this one.
        atexit.register(ray.shutdown)


def _check_reachable(address: str | None) -> None:
    """ray.init retries an address where nothing listens for good (measured: still retrying
    after 5 minutes), so a mistyped --ray-address would hang the start: try the port first."""
    address = address or ""
    if "://" in address and not address.startswith("ray://"):
        return  # not an address ray.init takes: Ray says so itself
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or none: Ray finds or starts the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{_flag(address)}: nothing answers there ({reason})") from None


def _flag(address: str | None) -> str:
    return f"Ray address {address} (--ray-address, or RAY_ADDRESS)"


def coordinator_host(address: str | None) -> str:
    """The address ranks reach the coordinator at: loopback when the cluster itself was given
    by a loopback address (it runs on this machine), else this node's IP."""
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0]
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass
    return ray.util.get_node_ip_address()


def bundle(device: str, extra: dict[str, float]) -> dict[str, float]:
    base = {"CPU": 1.0, "GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return {**base, **{k: float(v) for k, v in extra.items()}}


def plan_instances(settings: EngineSettings) -> list[Instance]:
    """Every attention instance, then every FFN instance, with the ranks each one holds."""
    shapes = parse_roles(settings)
    names = rank_names(settings)
    extras = (settings.attn_resources, settings.ffn_resources)
    plan = []
    for role, shape, ranks, extra in zip(("attention", "FFN"), shapes, names, extras, strict=True):
        g = shape.devices_per_instance
        for i in range(shape.num_instances):
            bundles = [bundle(settings.device, extra) for _ in range(g)]
            plan.append(Instance(role, i, ranks[i * g : (i + 1) * g], bundles))
    return plan


def reserve(plan: list[Instance]) -> list[PlacementGroup]:
    """One placement group per instance, all ready; none left behind if any cannot be placed."""
    groups = [placement_group(i.bundles, strategy="STRICT_PACK", name=_pg_name(i)) for i in plan]
    pending = {g.ready(): inst for g, inst in zip(groups, plan, strict=True)}
    refs = list(pending)
    _, late = ray.wait(refs, num_returns=len(refs), timeout=NOTICE_AFTER_S)
    if late:  # an autoscaler may still be adding nodes: say what we wait for
        print(f"afd: waiting for Ray to place {_demand(pending[late[0]])} ...", flush=True)
        _, late = ray.wait(refs, num_returns=len(refs), timeout=envs.STARTUP_TIMEOUT_S)
    if late:
        release(groups)
        inst = pending[late[0]]
        raise ConfigError(
            f"Ray could not place {_demand(inst)} within {envs.STARTUP_TIMEOUT_S:.0f}s "
            f"(AFD_STARTUP_TIMEOUT_S){_unknown(inst)}; an instance must fit on one node, "
            f"and the nodes have {node_resources()}. Check --attn/--ffn, --device and the "
            "role resources"
        )
    return groups


def node_resources(most: int = 8) -> str:
    """Each live node's resources (up to `most` nodes), without those Ray derives from
    placement groups and nodes: a STRICT_PACK group must fit one node, not the sum."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    shown = [
        f"{n.get('NodeManagerAddress')}: "
        + str({k: v for k, v in n["Resources"].items() if "_group_" not in k and ":" not in k})
        for n in nodes[:most]
    ]
    more = f" and {len(nodes) - most} more" if len(nodes) > most else ""
    return "; ".join(shown) + more


def _unknown(inst: Instance) -> str:
    """Names the requested resources no node has: a typo in --attn-resources, say."""
    missing = [k for k in inst.bundles[0] if k not in ray.cluster_resources()]
    if not missing:
        return ""
    flag = "--attn-resources" if inst.role == "attention" else "--ffn-resources"
    if missing == ["GPU"]:
        flag = "--device cuda"
    return f": no node has {', '.join(map(repr, missing))} ({flag})"


def _demand(inst: Instance) -> str:
    return f"{inst} ({len(inst.bundles)} x {inst.bundles[0]} on one node)"


def release(groups: list[PlacementGroup]) -> None:
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # already gone with its job or cluster: nothing left to free
            pass


def _pg_name(inst: Instance) -> str:
    return f"afd-{'attn' if inst.role == 'attention' else 'ffn'}-{inst.index}"


def format_plan(plan: list[Instance], where: dict[str, dict[str, object]]) -> str:
    """One line per rank: instance, node IP and id, devices; `where` from RankActor.where."""
    nodes = {str(w["node_ip"]) for w in where.values()}
    lines = [f"placement on {len(nodes)} node(s) of the Ray cluster ({len(plan)} instances):"]
    for inst in plan:
        for rank in inst.ranks:
            w = where[rank]
            devices = f"GPU {w['gpus']}" if w["gpus"] else "CPU"
            lines.append(
                f"  {str(inst):22} rank {rank:4} node {w['node_ip']} "
                f"(id {str(w['node_id'])[:12]}) {devices}"
            )
    return "\n".join(lines)
