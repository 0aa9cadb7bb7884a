"""``python -m server.distributed``: the single server's flags (``server.cli``) plus how to scale out.

Every flag is also an environment variable (``--num-replicas`` = ``JETMOE_NUM_REPLICAS``). Ray is an optional
dependency: without it the command says how to install it and exits with status 2. Nothing here imports Ray
or torch, so ``--help`` and flag errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.cli import _positive, build_parser, env_name, fail, number_at_least, parse_args
from server.distributed.replica import ReplicaSpec

PROG = "python -m server.distributed"
INSTALL_HINT = ("Ray Serve is not installed; install it with: pip install 'jetmoe-serve[ray]' "
                "(from a checkout: pip install -e '.[ray]')")


@dataclass(frozen=True)
class ScaleOptions:
    """How many engine replicas, with which resources, and when Serve adds or removes them.

    Autoscaling is on when ``min_replicas`` or ``max_replicas`` is set: Serve then keeps
    ``target_ongoing_requests`` requests on each replica on average (queued ones included), starting from
    ``num_replicas``. A replica takes at most ``max_ongoing_requests`` at once; the router skips a full one.
    ``num_gpus_per_replica`` None: one GPU when the engine runs on CUDA, none on CPU (decided at deploy time).
    """

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 64.0
    max_ongoing_requests: int = 128
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float | None = None
    drain_timeout: float = 30.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def replica_range(self) -> tuple[int, int, int]:
        """(min, initial, max) replicas; all three ``num_replicas`` without autoscaling."""
        if not self.autoscaling:
            return self.num_replicas, self.num_replicas, self.num_replicas
        low = 1 if self.min_replicas is None else self.min_replicas
        high = max(low, self.num_replicas) if self.max_replicas is None else self.max_replicas
        return low, min(max(self.num_replicas, low), high), high


@dataclass(frozen=True)
class DistributedArgs:
    """Everything the command was asked for."""

    args: argparse.Namespace
    spec: ReplicaSpec
    scale: ScaleOptions


def build_distributed_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """``server.cli``'s parser with the Ray Serve flags."""
    import os

    env = os.environ if environ is None else environ
    parser = build_parser(environ)
    parser.prog = PROG
    parser.description = ("The OpenAI-compatible JetMoe server scaled out over Ray Serve: N engine replicas "
                          "behind one ingress, with prefix-affinity routing. Joins the Ray cluster at "
                          "RAY_ADDRESS, or starts a local Ray instance on 127.0.0.1.")
    group = parser.add_argument_group("Ray Serve")

    def add(flag: str, help: str, default: str | None, type: Callable[[str], Any], metavar: str) -> None:
        name = env_name(flag)
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(flag, default=env.get(name, default), type=type, metavar=metavar,
                           help=f"{help}{shown} [{name}]")

    add("--num-replicas", "engine replicas (the initial number with autoscaling)", "1", _positive, "N")
    add("--min-replicas", "autoscale down to this many replicas (0 allowed)", None, _count, "N")
    add("--max-replicas", "autoscale up to this many replicas", None, _positive, "N")
    add("--target-ongoing-requests", "autoscaling target of requests per replica, queued ones included "
        "(default: --max-num-seqs, past which requests wait)", None, _positive_number, "N")
    add("--max-ongoing-requests", "requests one replica takes at once; the router skips a full replica "
        "(default: 2 x --max-num-seqs)", None, _positive, "N")
    add("--num-cpus-per-replica", "CPUs Ray reserves for each replica", "1", _resource, "N")
    add("--num-gpus-per-replica", "GPUs Ray reserves for each replica (default: 1 on cuda, 0 on cpu)", None,
        _resource, "N")
    return parser


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> DistributedArgs:
    """Flags -> what to deploy; any problem exits with one line and status 2."""
    parser = build_distributed_parser(environ)
    args, settings, engine = parse_args(argv, environ, parser=parser)
    if args.max_replicas is not None and args.min_replicas is not None and args.min_replicas > args.max_replicas:
        parser.error("--min-replicas must not be larger than --max-replicas")
    scale = ScaleOptions(
        num_replicas=args.num_replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=float(args.target_ongoing_requests or engine.max_num_seqs),
        max_ongoing_requests=args.max_ongoing_requests or 2 * engine.max_num_seqs,
        num_cpus_per_replica=args.num_cpus_per_replica, num_gpus_per_replica=args.num_gpus_per_replica,
        drain_timeout=settings.drain_timeout)
    # The engine core gets the replica's CPUs (one core is left to the event loop when it runs in-process).
    cpus = max(1, int(scale.num_cpus_per_replica))
    threads = args.cpu_threads or (max(1, cpus - 1) if args.engine_in_process else cpus)
    spec = ReplicaSpec(engine, settings, threads, args.engine_in_process, args.log_level)
    return DistributedArgs(args, spec, scale)


def builder_argv(args: dict[str, Any]) -> list[str]:
    """``{"model": "/m", "num-replicas": 2, "export_vllm_metrics": True}`` -> command-line flags."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if isinstance(value, bool):
            value = "true" if value else "false"
        argv += [flag, str(value)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, start or join Ray, deploy, serve until SIGTERM/SIGINT (which drains); the exit status."""
    try:
        parsed = parse(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, reported already)
        return exc.code if isinstance(exc.code, int) else 2
    if importlib.util.find_spec("ray") is None:
        return fail(INSTALL_HINT)
    logging.basicConfig(level=parsed.args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(parsed.spec.engine.model).is_dir():
        return fail(f"model directory {parsed.spec.engine.model!r} does not exist")
    from server.distributed.launch import serve_until_signalled

    return serve_until_signalled(parsed)


def _count(value: str) -> int:
    return 0 if value.strip() == "0" else _positive(value)


def _positive_number(value: str) -> float:
    return number_at_least(value, 0, True, "a positive number")


def _resource(value: str) -> float:
    return number_at_least(value, 0, False, "a number >= 0")


if __name__ == "__main__":
    sys.exit(main())
