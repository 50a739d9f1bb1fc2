"""The pipeline on a fresh local Ray, for tests, benchmarks and the soak script.

    pipeline = LocalPipeline.start({"stages": 3, "replica_cpus": 0.1})
    ... pipeline.http_url, pipeline.grpc_target, pipeline.metrics_url, pipeline.stats("Stage0") ...
    pipeline.stop()

It starts a real Ray (``num_cpus`` CPUs, metrics exported every second), Serve's HTTP and gRPC
proxies on free 127.0.0.1 ports, and the app under the name ``sedac``.

:class:`CliRayCluster` instead starts a multi-node cluster with ``ray start``, for ``serve deploy``
(tests/test_multinode.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

APP_NAME = "sedac"
GRPC_SERVICER = "sedac_ray.serve.grpc_service.add_SedacServiceServicer_to_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPipeline:
    http_url: str
    grpc_target: str
    metrics_url: str

    @classmethod
    def start(cls, app_args: dict, num_cpus: int = 2, env: dict[str, str] | None = None) -> LocalPipeline:
        import ray
        from ray import serve

        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        # Replicas inherit the environment of the Ray they start in; set here rather than in a
        # runtime_env, which Ray records (and a secret there would be written to its logs).
        os.environ.update(env or {})
        ray.init(
            address="local",  # a fresh Ray, never a `ray start` cluster running on this machine
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
        )
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        pipeline = cls(
            http_url=f"http://127.0.0.1:{http_port}",
            grpc_target=f"127.0.0.1:{grpc_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
        pipeline.deploy(app_args)
        return pipeline

    @staticmethod
    def deploy(app_args: dict, replicas: dict[str, int] | None = None, timeout_s: float = 900) -> None:
        """Deploy or update the app from a Serve config, as ``serve deploy`` does: an update that
        changes only ``replicas`` (deployment name -> count) scales those deployments and leaves
        every other replica, and the KV it holds, running."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        from sedac_ray.serve.app import LOW_OVERHEAD_ENV

        app = {
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "sedac_ray.serve.app:build_app",
            "args": app_args,
            "runtime_env": {"env_vars": LOW_OVERHEAD_ENV},
            "deployments": [{"name": name, "num_replicas": n} for name, n in (replicas or {}).items()],
        }
        client = _get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
        client._wait_for_application_running(APP_NAME, timeout_s=timeout_s)

    @staticmethod
    def handle(deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=APP_NAME)

    def stats(self, deployment: str) -> list[dict]:
        """``stats()`` of every replica of a stage deployment."""
        return self.handle(deployment).broadcast("stats").results()

    @staticmethod
    def stop() -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@dataclass
class CliRayCluster:
    """A Ray cluster of ``ray start`` nodes on this machine, started the way a user (or KubeRay)
    starts one, for tests of what only a real multi-node cluster shows:

        cluster = CliRayCluster.start([{"node_a": 10}, {"node_b": 10}])
        ... `serve deploy -a cluster.dashboard_url` with cluster.env, cluster.alive("actors") ...
        cluster.stop()

    The first node is the head. Each node gets its own custom resources (deployments pin replicas
    to a node with ``ray_actor_options: {resources: {node_a: 1}}``), free ports and a private temp
    dir, so neither ``ray.init()`` elsewhere on the machine nor this cluster attaches to the other.
    Each ``ray start --block`` stays in the foreground as a process group of its own, so ``stop``
    ends exactly this cluster's processes (``ray stop`` would end every Ray on the machine).
    Replicas import the ``sedac_ray`` this process imports (a worktree's, say): its root leads
    the nodes' ``PYTHONPATH``.
    """

    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    processes: list[subprocess.Popen]
    # Ray's token auth is on: the nodes listen on the machine's address, not only on loopback.
    token: str = field(repr=False)
    env: dict[str, str] = field(repr=False)  # of every node, with the token; CLI clients need it

    @classmethod
    def start(
        cls,
        node_resources: list[dict[str, float]],
        num_cpus: float = 1,
        env: dict[str, str] | None = None,
        timeout_s: float = 180,  # per node; generous, for a machine that runs much else
    ) -> CliRayCluster:
        if not node_resources:
            raise ValueError("node_resources needs one entry per node, the head first")
        # Short and under /tmp: Ray's Unix socket paths under it must stay below ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="sedac-ray-"))
        gcs_port, dashboard_port = free_port(), free_port()
        token = secrets.token_hex(32)
        cluster = cls(
            temp_dir=temp_dir,
            gcs_address=f"127.0.0.1:{gcs_port}",
            dashboard_url=f"http://127.0.0.1:{dashboard_port}",
            processes=[],
            env={
                **os.environ,
                "PYTHONPATH": _pythonpath(),
                # Our own token, not whatever `ray.init()` left in ~/.ray/auth_token.
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": token,
                **(env or {}),
            },
            token=token,
        )
        head_flags = [
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true",  # `serve deploy` and the state API talk to it
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
        ]
        try:
            for index, resources in enumerate(node_resources):
                role = head_flags if index == 0 else [f"--address={cluster.gcs_address}"]
                cluster._start_node(index, role, resources, num_cpus)
                cluster._wait_for_nodes(index + 1, timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_node(self, index: int, role: list[str], resources: dict, num_cpus: float) -> None:
        command = [
            str(cli_executable("ray")),
            "start",
            "--block",
            *role,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--object-store-memory={200 * 1024**2}",
            "--disable-usage-stats",
        ]
        with open(self.temp_dir / f"ray-start-{index}.log", "wb") as log:  # the child keeps its copy
            self.processes.append(
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                    # SIGTERM makes `ray start --block` end its node; so does its starter's death.
                    preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
                )
            )

    def api(self, path: str) -> dict:
        """GET a path of the dashboard's REST API (Serve's, the state API's) with the token."""
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)

    def alive(self, resource: str) -> list[dict]:
        """Alive ``nodes`` or ``actors`` from the state API, in detail: ``node_id``,
        ``resources_total`` of a node; ``class_name``, ``node_id`` of an actor."""
        query = urllib.parse.urlencode(
            {"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE", "detail": 1}
        )
        return self.api(f"/api/v0/{resource}?{query}")["data"]["result"]["result"]

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                alive = len(self.alive("nodes"))
                if alive >= count:
                    return
                last = f"{alive} alive"
            except (OSError, ValueError, KeyError) as err:  # the dashboard is still starting
                last = f"{type(err).__name__}: {err}"
            exited = [index for index, p in enumerate(self.processes) if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                why = f"`ray start` of node(s) {exited} exited" if exited else f"not after {timeout_s:.0f} s"
                raise RuntimeError(
                    f"Ray cluster in {self.temp_dir}: {count} node(s) should be alive, {why} "
                    f"(state API: {last})\n{self.logs()}"
                )
            time.sleep(1)

    def logs(self, tail_chars: int = 3000) -> str:
        """The end of each ``ray start`` log, for failure messages."""
        return "\n".join(
            f"--- {path.name}:\n{path.read_text(errors='replace')[-tail_chars:]}"
            for path in sorted(self.temp_dir.glob("ray-start-*.log"))
        )

    def stop(self, timeout_s: float = 30) -> None:
        """End every process of this cluster, workers first, then the head; SIGKILL stragglers."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()  # `ray start --block` then ends the processes it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its process group
        left = self.processes_left()
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def processes_left(self) -> list[psutil.Process]:
        """Processes of this cluster still running (zombies are not): in a ``ray start``'s process
        group, or with the cluster's temp dir on their command line (should one have left its group)."""
        groups = {process.pid for process in self.processes}
        left = []
        for process in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(process.pid) in groups or any(
                    str(self.temp_dir) in arg for arg in process.info["cmdline"] or ()
                ):
                    left.append(process)
        return left


def cli_executable(name: str) -> Path:
    """``ray`` or ``serve`` of this Python's environment (a venv's bin/), not whatever is on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install ray[serve] into the environment of {sys.executable}"
        )
    return path


def _terminate_with_parent() -> None:
    """In a child before exec: SIGTERM it when its parent dies (a test run killed midway)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
