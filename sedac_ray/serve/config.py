"""The serving application's settings: one pydantic model, built from `serve run` args or YAML.

Ray Serve validates the app's ``args`` against it when the app is built (``build_app`` is annotated
with it), so a bad config fails at deploy time with the field named, not inside every replica.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sedac_ray.exit.store import calibrated_default, model_name_for_spec
from sedac_ray.exit.store import default_policy as calibrated_policy
from sedac_ray.model.loading import DEFAULT_MODEL, resolve_dtype
from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy

EXIT_SETTINGS = ("tau", "k", "min_layer", "window", "disable", "probe")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, min_length=1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    dtype: str | None = None  # float32 / bfloat16 / float16 (or fp32, bf16, fp16, auto); None: by device
    stages: int = Field(3, gt=0)  # decoder layers split evenly over this many stage deployments...
    boundaries: list[int] | None = None  # ...or at these layer indices, e.g. [10, 20] for 3 stages
    exit: dict[str, Any] = Field(default_factory=dict)  # server default policy: EXIT_SETTINGS
    default_max_tokens: int = Field(128, gt=0)
    max_batch_size: int = Field(32, gt=0)  # step messages a stage or the LM head merges into one batch
    batch_wait_timeout_s: float = Field(0.003, ge=0)
    steps_in_flight: int = Field(2, gt=0)  # front-door step batches in the pipeline at once
    step_gather_timeout_s: float = Field(0.05, ge=0)  # longest a front-door step batch waits for members
    # Exit adapters file (`sedac calibrate` writes one) applied to exited tokens' read-out, as
    # Engine(adapters=...) does; None: exited tokens go straight to the final norm and head.
    exit_adapters: str | None = None
    draft_limit: int = Field(4, gt=0)  # speculative requests: unverified tokens ahead of committed ones
    # Speculative drafts read out by the model's draft head and gated by its confidence, as in the
    # engine (the model's speculation file, when it has one); False: the full head reads them out.
    draft_head: bool = True
    step_timeout_s: float = Field(60.0, gt=0)  # a step that does not come back in time fails the request
    stage_replicas: list[int] | None = None  # fixed replicas per stage (YAML `deployments:` can override)
    replica_cpus: float | None = Field(None, gt=0)  # CPUs reserved per replica (None: Ray's default, 1)
    torch_threads: int | None = Field(None, gt=0)  # intra-op threads per replica (None: Ray's, 1 per CPU)
    # Admission and limits: past them a request gets 429 / RESOURCE_EXHAUSTED (or 413), never an OOM.
    max_concurrent_requests: int = Field(64, gt=0)  # per front-door replica
    # KV pool per stage replica, sized once at start (None: max_concurrent_requests sequences)
    kv_budget_mb: float | None = Field(512.0, gt=0)
    max_model_len: int | None = Field(None, gt=0)  # positions per sequence; None: min(model's, 2048)
    admission_wait_s: float = Field(2.0, ge=0)  # a prefill waits this long for a KV slot, then 429
    prefill_chunk_tokens: int = Field(256, gt=0)  # a stage prefills long prompts this many tokens at a time
    max_request_bytes: int = Field(1 << 20, gt=0)  # HTTP body or gRPC message
    request_timeout_s: float = Field(300.0, gt=0)  # whole request, prefill to last token
    kv_lease_s: float = Field(120.0, gt=0)  # a stage frees a sequence that saw no traffic this long
    # Auth: a bearer key read from this environment variable; auth is off while it is unset.
    api_key_env: str = Field("SEDAC_API_KEY", min_length=1)
    require_api_key: bool = False  # refuse to start without the key

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str | None) -> str | None:
        if dtype is not None:
            resolve_dtype(dtype, "cpu")  # raises, naming the supported ones
        return dtype

    @field_validator("boundaries")
    @classmethod
    def _increasing_boundaries(cls, boundaries: list[int] | None) -> list[int] | None:
        if boundaries is None:
            return None
        pairs = zip(boundaries, boundaries[1:], strict=False)
        if not boundaries or boundaries[0] < 1 or any(b <= a for a, b in pairs):
            raise ValueError(f"must be layer indices >= 1 that increase strictly, got {boundaries}")
        return boundaries

    @field_validator("stage_replicas")
    @classmethod
    def _positive_replicas(cls, replicas: list[int] | None) -> list[int] | None:
        if replicas is not None and any(r < 1 for r in replicas):
            raise ValueError(f"every stage needs at least 1 replica, got {replicas}")
        return replicas

    @field_validator("exit")
    @classmethod
    def _known_exit_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(settings) - set(EXIT_SETTINGS))
        if unknown:
            raise ValueError(f"unknown exit settings {unknown}; allowed: {sorted(EXIT_SETTINGS)}")
        if settings:
            DEFAULT_POLICY.with_overrides(**settings)  # ExitPolicy says which value is out of range
        return settings

    @model_validator(mode="after")
    def _replicas_for_every_stage(self) -> PipelineConfig:
        if self.stage_replicas is not None and len(self.stage_replicas) != self.num_stages:
            raise ValueError(
                f"stage_replicas has {len(self.stage_replicas)} entries for {self.num_stages} stages"
            )
        return self

    @classmethod
    def from_args(cls, args: dict | None) -> PipelineConfig:
        """The config from a raw args dict (what replicas receive); a ValueError names each bad field."""
        try:
            config = cls.model_validate(dict(args or {}))
        except ValidationError as err:
            raise ValueError(describe_errors(err)) from None
        config.default_policy()  # fail at build time, not on the first request (e.g. a broken file)
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

    def model_len(self, model_max: int) -> int:
        """Positions each sequence may use: ``max_model_len``, or the model's context up to 2048
        (every stage reserves that many per sequence, so the default stays modest)."""
        if self.max_model_len is None:
            return min(model_max, 2048)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context of {model_max}")
        return self.max_model_len

    def exit_probes_path(self, num_layers: int | None, dtype=None) -> Path | None:
        """The model's calibrated exit probes in ``dtype`` (default: the dtype it will load in),
        when it has them: stages load them to serve probe policies, and the front door refuses a
        probe policy without them."""
        dtype = resolve_dtype(self.dtype, self.device) if dtype is None else dtype
        calibration, _ = calibrated_default(model_name_for_spec(self.model), num_layers, dtype)
        return calibration.probes_path if calibration is not None else None

    def default_policy(self) -> ExitPolicy:
        if self.exit:
            policy = DEFAULT_POLICY.with_overrides(**self.exit)
            if policy.uses_probe and self.exit_probes_path(None) is None:
                raise ValueError(f"exit policy {policy.describe()} needs exit probes; {self.model} has none")
            return policy
        # No `exit:` in the app: the calibration file for the model in the dtype it will load in
        # (`sedac calibrate`) decides; without one, no exit.
        dtype = resolve_dtype(self.dtype, self.device)
        policy, source = calibrated_policy(model_name_for_spec(self.model), dtype=dtype)
        logging.getLogger("ray.serve").info(f"default exit policy {policy.describe()}, from {source}")
        return policy


def describe_errors(err: ValidationError) -> str:
    """One line per bad field: ``name: what is wrong (got value)``; unknown names list the known ones."""
    lines = []
    for error in err.errors():
        where = ".".join(str(part) for part in error["loc"]) or "args"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown sedac-ray app arg {where!r}; known: {sorted(PipelineConfig.model_fields)}")
        elif not error["loc"]:  # a check across fields: the input is the whole config
            lines.append(message)
        else:
            lines.append(f"{where}: {message} (got {error['input']!r})")
    return "; ".join(lines)
