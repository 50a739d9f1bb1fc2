"""Serving configuration without a cluster: generated gRPC modules, app args, deploy configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sedac_ray.deploy.validate import file_problems, serve_config_problems
from sedac_ray.policy import ExitPolicy
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.protos import generate

REPO = Path(__file__).resolve().parents[1]


def test_generated_grpc_modules_match_the_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = REPO / "sedac_ray" / "serve" / "generated" / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"run `python -m sedac_ray.serve.protos` ({fresh.name})"
        )


def test_layer_ranges_split_evenly_or_at_boundaries():
    assert PipelineConfig(stages=3).layer_ranges(30) == [(0, 10), (10, 20), (20, 30)]
    assert PipelineConfig(stages=4).layer_ranges(30) == [(0, 8), (8, 15), (15, 22), (22, 30)]
    assert PipelineConfig(boundaries=[6, 24]).layer_ranges(30) == [(0, 6), (6, 24), (24, 30)]
    with pytest.raises(ValueError, match="must increase strictly within 1..29"):  # past the model's depth
        PipelineConfig(boundaries=[10, 30]).layer_ranges(30)
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        PipelineConfig(stages=31).layer_ranges(30)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"stagez": 3}, "unknown sedac-ray app arg 'stagez'; known: ["),
        ({"stages": 0}, "stages: Input should be greater than 0 (got 0)"),
        ({"stages": "three"}, "stages: Input should be a valid integer"),
        ({"device": "gpu"}, "device: String should match pattern"),
        ({"dtype": "fp8"}, "dtype: dtype 'fp8' is not supported; use one of"),
        ({"request_timeout_s": -1}, "request_timeout_s: Input should be greater than 0 (got -1)"),
        ({"kv_budget_mb": 0}, "kv_budget_mb: Input should be greater than 0 (got 0)"),
        ({"boundaries": [20, 10]}, "boundaries: must be layer indices >= 1 that increase strictly"),
        ({"stage_replicas": [1, 0, 1]}, "stage_replicas: every stage needs at least 1 replica"),
        ({"stages": 2, "stage_replicas": [1, 1, 1]}, "stage_replicas has 3 entries for 2 stages"),
        ({"exit": {"tau": 2.0}}, "exit: tau must be in (0, 1], got 2.0"),
        ({"exit": {"tua": 0.9}}, "exit: unknown exit settings ['tua']; allowed:"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_app_args_name_the_field(args, message):
    with pytest.raises(ValueError) as err:
        PipelineConfig.from_args(args)
    assert str(err.value).startswith(message), str(err.value)


def test_app_args_keep_their_defaults_and_round_trip():
    config = PipelineConfig.from_args({"stages": 2, "exit": {"tau": 0.99, "k": 3}})
    assert (config.model, config.device, config.dtype) == ("smollm2-135m", "cpu", None)
    limits = (config.max_concurrent_requests, config.kv_budget_mb, config.max_request_bytes)
    assert limits == (64, 512.0, 1 << 20)
    # Replicas get the args back as a dict (build_app passes model_dump(exclude_unset=True)).
    assert PipelineConfig.from_args(config.model_dump(exclude_unset=True)) == config
    assert config.model_dump(exclude_unset=True) == {"stages": 2, "exit": {"tau": 0.99, "k": 3}}


def test_a_probe_policy_is_the_default_only_where_the_model_has_exit_probes():
    config = PipelineConfig.from_args({"exit": {"probe": 0.9, "min_layer": 20}})
    assert config.default_policy() == ExitPolicy(tau=None, min_layer=20, probe=0.9)
    assert config.exit_probes_path(30).is_file()  # the shipped fp32 calibration's probes
    assert PipelineConfig.from_args({"dtype": "bf16"}).exit_probes_path(30) is None  # none for bf16
    with pytest.raises(ValueError, match="needs exit probes; smollm2-135m has none"):
        PipelineConfig.from_args({"dtype": "bf16", "exit": {"probe": 0.9}})


def test_serve_validates_app_args_against_pipeline_config_when_building():
    import inspect

    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from sedac_ray.serve.app import build_app

    # Ray converts builder args only when the sole parameter is annotated with the model class itself.
    assert inspect.signature(build_app).parameters["args"].annotation is PipelineConfig
    with pytest.raises(ValidationError, match="max_batch_size"):
        call_user_app_builder_with_args_if_necessary(build_app, {"stages": 3, "max_batch_size": 0})
    app = call_user_app_builder_with_args_if_necessary(build_app, {"stages": 2, "exit": {"disable": True}})
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize("path", sorted((REPO / "deployments").glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_configs_are_valid_serve_configs(path):
    # Ray's ServeDeploySchema, keys Ray does not know, imports, sedac-ray's app args and deployment names
    problems = file_problems(path, name=f"deployments/{path.name}")
    assert problems == [], "\n".join(problems)


def _local_config() -> dict:
    return yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda c: c["grpc_options"].update(request_timeout=5),  # request_timeout_s misspelled
            "local.yaml: grpc_options.request_timeout: unknown key (Ray would ignore it silently); "
            "did you mean 'request_timeout_s'? "
            "known: enable_reflection, grpc_servicer_functions, port, request_timeout_s",
        ),
        (
            lambda c: c["grpc_options"]["grpc_servicer_functions"].append("sedac_ray.serve.nowhere.add_X"),
            "local.yaml: grpc_options.grpc_servicer_functions[1]: cannot import module "
            "'sedac_ray.serve.nowhere'",
        ),
        (
            lambda c: c["applications"][0].update(import_path="sedac_ray.serve.app:build"),
            "local.yaml: applications[sedac].import_path: module 'sedac_ray.serve.app' has no attribute "
            "'build'",
        ),
        (
            lambda c: c["applications"][0]["deployments"][1]["ray_actor_options"].update(num_cpus="half"),
            "local.yaml: applications[sedac].deployments[Stage0].ray_actor_options.num_cpus: "
            "Input should be a valid number, unable to parse string as a number (got 'half')",
        ),
        (
            lambda c: c["applications"][0]["deployments"][1].update(
                num_replicas=None, autoscaling_config={"min_replicas": 3, "max_replicas": 2}
            ),
            "local.yaml: applications[sedac].deployments[Stage0].autoscaling_config: Value error, "
            "max_replicas (2) must be greater than or equal to min_replicas (3)!",
        ),
        (
            lambda c: c["applications"][0]["deployments"].append({"name": "Stage3"}),
            "local.yaml: applications[sedac].deployments[Stage3].name: no deployment 'Stage3' in this app",
        ),
        (
            lambda c: c["applications"][0]["args"].update(stages=0),
            "local.yaml: applications[sedac].args: stages: Input should be greater than 0 (got 0)",
        ),
    ],
    ids=["grpc-key", "servicer-import", "import-path", "field-type", "autoscaling", "deployment", "args"],
)
def test_broken_serve_configs_are_named_by_file_and_field(break_it, message):
    config = _local_config()
    assert serve_config_problems(config, "local.yaml") == []
    broken = copy.deepcopy(config)
    break_it(broken)
    problems = serve_config_problems(broken, "local.yaml")
    assert any(problem.startswith(message) for problem in problems), problems


@pytest.mark.parametrize("path", sorted((REPO / "deployments").glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_configs_run_replicas_with_the_low_overhead_settings(path):
    """The measured Serve settings reach every replica of the app, in every shipped config."""
    from sedac_ray.serve.app import LOW_OVERHEAD_ENV

    for app in yaml.safe_load(path.read_text())["applications"]:
        assert app["runtime_env"]["env_vars"] == LOW_OVERHEAD_ENV, path
