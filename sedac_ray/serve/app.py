"""The application builder: `serve run` config args -> the pipeline application.

    FrontDoor -> Stage0 -> Stage1 -> ... -> StageN-1
                   \\________\\_____________\\____> LMHead

``import_path: sedac_ray.serve.app:build_app`` with ``args`` holding :class:`PipelineConfig`
fields. Per-deployment settings (replicas, autoscaling, resources) come from the config's
``deployments:`` list, by name: ``FrontDoor``, ``Stage0``..``StageN-1``, ``LMHead``.
"""

# No `from __future__ import annotations` here: Ray Serve reads build_app's annotation as a class to
# validate the app's args against it, and a postponed (string) annotation would skip that.
from ray import serve
from ray.serve.config import RequestRouterConfig

from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.front_door import FrontDoor
from sedac_ray.serve.head import HeadServer
from sedac_ray.serve.stage import StageServer

DEPLOYMENT_LEVEL = ("stage_replicas", "replica_cpus")
# Serve's lower-overhead settings, for the app's replicas (`runtime_env.env_vars` of the app in
# deployments/*.yaml): user code and handle routers on the replica's own event loop (every handler
# here is async and keeps tensor work off the loop), buffered request logs, and calls between
# deployments over gRPC instead of the object store. Measured on 16 streams through 3 stages:
# 74 against 67 tokens/s (docs/performance.md).
LOW_OVERHEAD_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
STICKY_ROUTER = RequestRouterConfig(request_router_class="sedac_ray.serve.routing:PinnedReplicaRouter")

# Waiting for K/V (see stage.py) holds a request slot, so stages admit many more requests than
# they batch; batches are capped by PipelineConfig.max_batch_size instead. build_app sizes the
# slots from the admission limit (see stage_request_slots).
Stage = serve.deployment(
    StageServer, name="Stage", max_ongoing_requests=256, request_router_config=STICKY_ROUTER
)
LMHead = serve.deployment(HeadServer, name="LMHead", max_ongoing_requests=256)
Ingress = serve.deployment(FrontDoor, name="FrontDoor", max_ongoing_requests=256)


def stage_request_slots(config: PipelineConfig) -> int:
    """Request slots per stage replica. A sequence holds at most three calls at a stage at once
    (its step, a fill, and at the last stage one verification poll), so 8 per admitted request
    leaves room for several front-door replicas: steps that would answer waiting calls never
    queue behind them."""
    return max(256, 8 * config.max_concurrent_requests)


def build_app(args: PipelineConfig) -> serve.Application:
    """``serve run`` validates the app's args into the annotated PipelineConfig (the annotation must be
    the class alone for Ray to see it); Python callers may also pass the raw args dict."""
    if isinstance(args, PipelineConfig):
        config = args
        config.default_policy()  # a broken calibration file fails here, not in every replica
    else:
        config = PipelineConfig.from_args(args)
    # Replicas get every setting but the deployment-level ones: scaling a stage then changes only
    # its replica count, and Serve leaves every other replica (and the KV it holds) running.
    raw = config.model_dump(exclude_unset=True, exclude=set(DEPLOYMENT_LEVEL))
    actor = (
        {"ray_actor_options": {"num_cpus": config.replica_cpus}} if config.replica_cpus is not None else {}
    )
    replicas = config.stage_replicas
    head = LMHead.options(**actor).bind(raw)
    stages: list = []
    next_stage = None
    for index in reversed(range(config.num_stages)):
        options = {"name": f"Stage{index}", "max_ongoing_requests": stage_request_slots(config), **actor}
        if replicas is not None:  # otherwise num_replicas or autoscaling comes from the YAML config
            options["num_replicas"] = replicas[index]
        next_stage = Stage.options(**options).bind(raw, index, next_stage, head)
        stages.insert(0, next_stage)
    return Ingress.options(**actor).bind(raw, stages, head)
