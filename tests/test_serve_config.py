"""Serving configuration without a cluster: generated gRPC modules, app args, deploy configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sedac_ray.deploy.validate import file_problems, serve_config_problems
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
    with pytest.raises(ValueError, match="must increase strictly"):
        PipelineConfig(boundaries=[20, 10]).layer_ranges(30)
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        PipelineConfig(stages=31).layer_ranges(30)


def test_bad_app_args_fail_at_build_time():
    with pytest.raises(ValueError, match=r"unknown sedac-ray app args \['stagez'\]"):
        PipelineConfig.from_args({"stagez": 3})
    with pytest.raises(ValueError, match="tau must be in"):
        PipelineConfig.from_args({"exit": {"tau": 2.0}})


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
            "local.yaml: applications[sedac].args: stages must be >= 1, got 0",
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
