"""Serving configuration without a cluster: generated gRPC modules, app args, deploy configs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.protos import generate

REPO = Path(__file__).resolve().parents[1]
GRPC_OPTION_KEYS = {"port", "grpc_servicer_functions", "request_timeout_s"}


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
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)  # Serve's own schema
    assert set(config["grpc_options"]) <= GRPC_OPTION_KEYS  # a misspelled key would be ignored silently
    for function in config["grpc_options"]["grpc_servicer_functions"]:
        module, name = function.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
    for app in config["applications"]:
        module, name = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), name)
        pipeline = PipelineConfig.from_args(app["args"])
        names = {d["name"] for d in app.get("deployments", [])}
        expected = {"FrontDoor", "LMHead"} | {f"Stage{i}" for i in range(pipeline.num_stages)}
        assert names <= expected, f"deployments {sorted(names - expected)} do not exist in the app"
        assert callable(builder)
