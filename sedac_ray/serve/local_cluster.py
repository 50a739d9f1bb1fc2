"""The pipeline on a fresh local Ray, for tests, benchmarks and the soak script.

    pipeline = LocalPipeline.start({"stages": 3, "replica_cpus": 0.1})
    ... pipeline.http_url, pipeline.grpc_target, pipeline.metrics_url, pipeline.stats("Stage0") ...
    pipeline.stop()

It starts a real Ray (``num_cpus`` CPUs, metrics exported every second), Serve's HTTP and gRPC
proxies on free 127.0.0.1 ports, and the app under the name ``sedac``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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

        app = {
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "sedac_ray.serve.app:build_app",
            "args": app_args,
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
