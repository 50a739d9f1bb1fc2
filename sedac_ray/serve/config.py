"""The serving application's settings: one dataclass, built from `serve run` args or YAML."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from sedac_ray.exit.store import default_policy as calibrated_policy
from sedac_ray.exit.store import model_name_for_spec
from sedac_ray.model.loading import DEFAULT_MODEL, resolve_dtype
from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str | None = None
    stages: int = 3  # decoder layers split evenly over this many stage deployments...
    boundaries: list[int] | None = None  # ...or at these layer indices, e.g. [10, 20] for 3 stages
    exit: dict = field(default_factory=dict)  # server default policy: tau, k, min_layer, window, disable
    default_max_tokens: int = 128
    max_batch_size: int = 32  # step messages a stage or the LM head merges into one batch
    batch_wait_timeout_s: float = 0.003
    steps_in_flight: int = 2  # front-door step batches in the pipeline at once (pipelining depth)
    step_gather_timeout_s: float = 0.05  # longest a front-door step batch waits for its members
    draft_limit: int = 4  # speculative requests: unverified tokens ahead of the committed ones
    step_timeout_s: float = 60.0  # a step that does not come back in time fails the request
    stage_replicas: list[int] | None = None  # fixed replicas per stage (YAML `deployments:` can override)
    replica_cpus: float | None = None  # CPUs reserved per replica (None: Ray's default of 1)
    torch_threads: int | None = None  # intra-op threads per replica (None: what Ray sets, 1 per CPU)
    # Admission and limits: past them a request gets 429 / RESOURCE_EXHAUSTED (or 413), never an OOM.
    max_concurrent_requests: int = 64  # per front-door replica
    kv_budget_mb: float | None = 512.0  # KV cache per stage replica (None: unbounded)
    max_request_bytes: int = 1 << 20  # HTTP body or gRPC message
    request_timeout_s: float = 300.0  # whole request, prefill to last token
    kv_lease_s: float = 120.0  # a stage frees a sequence that saw no traffic this long (orphaned)
    # Auth: a bearer key read from this environment variable; auth is off while it is unset.
    api_key_env: str = "SEDAC_API_KEY"
    require_api_key: bool = False  # refuse to start without the key

    @classmethod
    def from_args(cls, args: dict | None) -> PipelineConfig:
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown sedac-ray app args {unknown}; known: {sorted(known)}")
        config = cls(**args)
        config.default_policy()  # fail at build time, not on the first request
        if config.boundaries is None and config.stages < 1:
            raise ValueError(f"stages must be >= 1, got {config.stages}")
        for name in ("max_concurrent_requests", "max_request_bytes", "max_batch_size", "draft_limit"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        for name in ("request_timeout_s", "step_timeout_s", "kv_budget_mb", "kv_lease_s"):
            value = getattr(config, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        return config

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1 if self.boundaries is not None else self.stages

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each stage over ``num_layers`` decoder layers."""
        if self.boundaries is not None:
            cuts = [0, *self.boundaries, num_layers]
        else:
            if self.stages > num_layers:
                raise ValueError(f"stages={self.stages} exceeds the model's {num_layers} layers")
            cuts = [round(i * num_layers / self.stages) for i in range(self.stages + 1)]
        if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)) or cuts[-1] != num_layers:
            raise ValueError(
                f"boundaries {self.boundaries} must increase strictly within 1..{num_layers - 1}"
            )
        return list(zip(cuts, cuts[1:], strict=False))

    def default_policy(self) -> ExitPolicy:
        allowed = {"tau", "k", "min_layer", "window", "disable"}
        unknown = sorted(set(self.exit) - allowed)
        if unknown:
            raise ValueError(f"unknown exit settings {unknown}; allowed: {sorted(allowed)}")
        if self.exit:
            return DEFAULT_POLICY.with_overrides(**self.exit)
        # No `exit:` in the app: the calibration file for the model in the dtype it will load in
        # (`sedac calibrate`) decides; without one, no exit.
        dtype = resolve_dtype(self.dtype, self.device)
        policy, source = calibrated_policy(model_name_for_spec(self.model), dtype=dtype)
        logging.getLogger("ray.serve").info(f"default exit policy {policy.describe()}, from {source}")
        return policy
