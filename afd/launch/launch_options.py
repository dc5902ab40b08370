"""`afd-serve`'s launch flags (local processes or a Ray cluster, failure and shutdown policy),
the --dry-run placement report, and serving that shuts down gracefully on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import socket
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from afd import envs
from afd.config import ConfigError
from afd.engine.builder import EngineSettings, parse_roles
from afd.launch.local import rank_names


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("launch")
    g.add_argument(
        "--launcher",
        choices=["local", "ray"],
        default=None,
        help="ranks as local processes or Ray actors (default: ray when a Ray address is given)",
    )
    g.add_argument("--ray-address", default=envs.ray_address(), help="default: $RAY_ADDRESS")
    g.add_argument(
        "--attn-resources",
        default=None,
        help='Ray resources per attention device, JSON: \'{"attn_node": 1}\' ("CPU": n sets the '
        "CPUs, and torch threads, of each rank; default 1)",
    )
    g.add_argument("--ffn-resources", default=None, help="same, per FFN device")
    g.add_argument("--restart-on-failure", action="store_true", help="restart ranks that die")
    g.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="SIGTERM: seconds to finish requests"
    )
    g.add_argument("--dry-run", action="store_true", help="print the placement plan and exit")


def launch_fields(args: argparse.Namespace) -> dict[str, object]:
    """The EngineSettings fields the launch flags set."""
    launcher = args.launcher or ("ray" if args.ray_address else "local")
    if not args.shutdown_timeout >= 0:  # NaN too
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if launcher == "ray" and args.colocated:
        raise ConfigError("--launcher ray starts attention and FFN ranks; drop --colocated")
    if launcher == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--launcher ray needs Ray: pip install 'afd[ray]'")
    return {
        "launcher": launcher,
        "ray_address": args.ray_address,
        "attn_resources": parse_resources(args.attn_resources, "--attn-resources"),
        "ffn_resources": parse_resources(args.ffn_resources, "--ffn-resources"),
        "restart_on_failure": args.restart_on_failure,
        "shutdown_timeout_s": args.shutdown_timeout,
    }


def parse_resources(text: str | None, flag: str) -> dict[str, float]:
    """`--attn-resources '{"attn_node": 1}'`: custom Ray resources every bundle asks for."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: expected a JSON object like '{{\"attn_node\": 1}}': {e}") from e
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and v > 0 for v in value.values()
    ):
        raise ConfigError(f"{flag}: expected a JSON object of positive numbers, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def placement_plan(settings: EngineSettings) -> str:
    if settings.launcher == "ray":
        from afd.launch.ray_launcher import placement_report

        return placement_report(settings)
    attn, ffn = rank_names(settings)
    shapes = parse_roles(settings)
    device = "GPU" if settings.device == "cuda" else "CPU"
    lines = [f"placement on this machine (local launcher, {len(attn) + len(ffn)} processes):"]
    for i, name in enumerate(attn + ffn):
        role, shape = ("attention", shapes[0]) if i < len(attn) else ("FFN", shapes[1])
        index = (i if i < len(attn) else i - len(attn)) // shape.devices_per_instance
        gpu = f" {i}" if device == "GPU" else ""
        lines.append(f"  {f'{role} instance {index}':22} rank {name:4} {device}{gpu}")
    return "\n".join(lines)


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Binds the API port before the model loads, as vLLM does: a port already in use fails at
    once, not after a load that can take many minutes. One socket per address `host` names
    (`localhost`: IPv4 and IPv6), as asyncio binds them; uvicorn listens once the model is
    ready, so until then connections are refused rather than left waiting."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    socks: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(found):
        sock = socket.socket(family, kind, proto)
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as e:
            for s in socks:
                s.close()
            raise ConfigError(f"--host {host} --port {port}: cannot bind: {e.strerror or e}") from e
    return socks


async def serve_until_sigterm(
    app: FastAPI,
    socks: list[socket.socket],
    shutdown_s: float,
    abort: Callable[[], Awaitable[None]],
) -> None:
    """On SIGTERM uvicorn stops accepting; in-flight requests may finish for shutdown_s, then
    abort() ends the rest with an error. uvicorn re-raises the signal once it is done: our
    handler (stop_on_sigterm) turns that into SystemExit, so the caller's `finally` still
    stops the coordinator."""
    host, port = socks[0].getsockname()[:2]
    config = uvicorn.Config(
        app, host=host, port=port, timeout_keep_alive=30, timeout_graceful_shutdown=shutdown_s + 5
    )
    try:  # uvicorn would listen too, and print a traceback where this fails
        for sock in socks:
            sock.listen(config.backlog)
    except OSError as e:  # another server bound the port as well while we loaded
        raise ConfigError(f"--port {port}: cannot listen: {e.strerror or e}") from e
    server = uvicorn.Server(config)
    deadline = asyncio.create_task(_abort_after(server, shutdown_s, abort))
    try:
        await server.serve(sockets=socks)
    finally:
        deadline.cancel()


async def _abort_after(
    server: uvicorn.Server, shutdown_s: float, abort: Callable[[], Awaitable[None]]
) -> None:
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(shutdown_s)
    await abort()


def stop_on_sigterm() -> None:
    """SIGTERM raises SystemExit (exit code 0), so `finally` blocks stop what we started."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
