"""Start (or join) Ray, deploy the application, serve until SIGTERM/SIGINT, drain every replica, stop.

Without ``RAY_ADDRESS`` a local Ray instance is started on 127.0.0.1 only (``server.distributed.loopback``),
with no dashboard and no usage statistics, and stopped on exit. With it, the command joins that cluster,
deploys the application there and deletes it on exit (other Serve applications are left alone).

The first SIGTERM or SIGINT drains: every replica stops admitting requests (503; ``/health`` answers 503),
in-flight requests run for ``--drain-timeout`` seconds and the rest end as on a single server; then Serve
and Ray stop and the command exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType
from typing import Any

from server.cli import fail
from server.distributed.cli import INSTALL_HINT, DistributedArgs
from server.distributed.loopback import LOOPBACK, local_ray_environment

logger = logging.getLogger("server.distributed")
STOP_TIMEOUT_S = 60.0


class _StopNow(BaseException):
    """A second signal arrived (a BaseException, like KeyboardInterrupt: nothing catches it on the way)."""


def serve_until_signalled(parsed: DistributedArgs) -> int:
    """The command's life after its flags parsed; the exit status."""
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        os.environ.update(local_ray_environment())  # before Ray is imported: its constants read these
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        return fail(f"{INSTALL_HINT} ({exc})")
    args = parsed.args
    port = args.port
    if local:
        try:
            port = _free_port(args.host, args.port)
        except OSError as exc:
            return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    _start_ray(local, args.log_level)
    signals = _Signals()  # after ray.init, which installs a SIGTERM handler of its own
    try:
        from server.distributed.app import APP_NAME, build_application

        serve.start(http_options={"host": args.host, "port": port, "keep_alive_timeout_s": args.keep_alive_timeout},
                    logging_config={"log_level": args.log_level.upper()})
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        ingress = serve.run(build_application(parsed.spec, parsed.scale, gpus), name=APP_NAME, route_prefix="/",
                            logging_config={"log_level": args.log_level.upper()})
        drain = ingress.drain  # resolved now: making a handle method talks to the cluster
        low, initial, high = parsed.scale.replica_range()
        scaling = f", autoscaling {low}..{high}" if parsed.scale.autoscaling else ""
        logger.info("serving %s as %r through Ray Serve: %d engine replica(s)%s, at http://%s:%d",
                    parsed.spec.engine.model, parsed.spec.settings.served_model_name, initial, scaling,
                    f"[{args.host}]" if ":" in args.host else args.host, port)
        signals.wait()
        _drain(drain, parsed.scale.drain_timeout)
    except _StopNow:
        logger.warning("second signal: stopping at once")
    finally:
        _stop_within(local, STOP_TIMEOUT_S)
        signals.restore()
    return 0


def _start_ray(local: bool, log_level: str) -> None:
    import ray

    level = getattr(logging, log_level.upper(), logging.INFO)
    if not local:
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=level)
        return
    ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, logging_level=level)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # Ray was imported before its environment could be set
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took node IP {node_ip}, not {LOOPBACK}")


class _Signals:
    """SIGTERM/SIGINT handling: the first signal sets ``stopping``, a second raises ``_StopNow``."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping.is_set():
            raise _StopNow
        logger.info("signal %d: draining (a second signal stops at once)", sig)
        self.stopping.set()

    def wait(self) -> None:
        while not self.stopping.wait(1.0):
            pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _drain(drain: Any, drain_timeout: float) -> None:
    """Drain every replica through the ingress; a failure (a replica died meanwhile) is logged."""
    try:
        drain.remote().result(timeout_s=drain_timeout + 60.0)
    except Exception as exc:
        logger.warning("drain failed: %s", exc)


def _stop_within(local: bool, timeout: float) -> None:
    """Stop Serve and Ray; when that hangs (Ray's own processes were killed too), exit the process."""
    done = threading.Event()

    def stop() -> None:
        try:
            _stop(local)
        except Exception as exc:
            logger.warning("stopping Ray Serve failed: %s", exc)
        finally:
            done.set()

    threading.Thread(target=stop, name="stop-ray", daemon=True).start()
    try:
        finished = done.wait(timeout)
    except _StopNow:
        finished = False
    if not finished:
        logger.error("Ray did not stop within %g s; exiting", timeout)
        os._exit(1)


def _stop(local: bool) -> None:
    import ray
    from ray import serve

    from server.distributed.app import APP_NAME

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _free_port(host: str, port: int) -> int:
    """``port``, checked free on ``host`` (0: a free one): a busy port fails before Ray starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return int(sock.getsockname()[1])
