"""The app on a real two-node Ray cluster, deployed the production way (issue 17, item 4).

`ray start --head` and `ray start --address=...` bring up two nodes on this machine, each with
its own custom resource; `serve deploy` places Stage0 and the front door on one node, Stage1 and
the LM head on the other. Answers over HTTP and gRPC must equal Hugging Face's greedy ones, so
hidden states and K/V really cross nodes intact; `serve shutdown` and the cluster's stop must
then leave no process of it behind. The same pipeline in bfloat16 runs beside it as a second
application, and must equal Hugging Face's own bf16 model (issue 13, item 4).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from sedac_ray.client import SedacClient
from sedac_ray.serve.local_cluster import (
    APP_NAME,
    GRPC_SERVICER,
    CliRayCluster,
    cli_executable,
    free_port,
)
from tests.conftest import CHAT_PROMPTS, PLAIN_PROMPTS, chat_prompt_ids, hf_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
BF16_APP, BF16_PREFIX = "sedac-bf16", "/bf16"  # the same pipeline in bfloat16, beside the float32 one
NODE_OF = {"FrontDoor": "node_a", "Stage0": "node_a", "Stage1": "node_b", "LMHead": "node_b"}
CPUS_OF = {"FrontDoor": 0.1, "Stage0": 0.4, "Stage1": 0.4, "LMHead": 0.3}
DEPLOY_TIMEOUT_S = 240


@dataclass
class Deployed:
    cluster: CliRayCluster
    http_url: str
    grpc_target: str


def application(name: str, route_prefix: str, dtype: str) -> dict:
    """Two stages of SmolLM2 (layers 1..15 and 16..30), each deployment pinned to its node."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "sedac_ray.serve.app:build_app",
        "args": {
            "model": "smollm2-135m",
            "device": "cpu",
            "dtype": dtype,
            "stages": 2,
            "exit": {"disable": True},
        },
        "deployments": [
            {
                "name": deployment,
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": CPUS_OF[deployment] / 2, "resources": {node: 1}},
            }
            for deployment, node in NODE_OF.items()
        ],
    }


def serve_config(http_port: int, grpc_port: int) -> dict:
    """The float32 app at ``/`` (HTTP and gRPC), the bfloat16 one at ``/bf16`` (HTTP)."""
    return {
        "proxy_location": "HeadOnly",  # one proxy; a proxy per node would bind the same ports twice
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": [
            application(APP_NAME, "/", "float32"),
            application(BF16_APP, BF16_PREFIX, "bfloat16"),
        ],
    }


def serve_cli(cluster: CliRayCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(cli_executable("serve")), *args, "-a", cluster.dashboard_url],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=120,
    )


def applications(cluster: CliRayCluster) -> dict:
    """Serve's applications by name, from the dashboard's REST API (what `serve status` reads)."""
    return cluster.api("/api/serve/applications/").get("applications", {})


def app_status(cluster: CliRayCluster, name: str) -> str:
    return applications(cluster).get(name, {}).get("status", "NOT_STARTED")


def wait_running(cluster: CliRayCluster) -> None:
    started = time.monotonic()
    for name in (APP_NAME, BF16_APP):
        status = app_status(cluster, name)
        while status != "RUNNING":
            waited = time.monotonic() - started
            if status == "DEPLOY_FAILED" or waited > DEPLOY_TIMEOUT_S:
                report = serve_cli(cluster, "status")
                pytest.fail(
                    f"app {name} is {status}, not RUNNING, after {waited:.0f} s\n"
                    f"`serve status`:\n{report.stdout}{report.stderr}\n{cluster.logs()}"
                )
            time.sleep(2)
            status = app_status(cluster, name)


@pytest.fixture(scope="module")
def cluster():
    cluster = CliRayCluster.start([{"node_a": 10}, {"node_b": 10}])
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes_left(), "processes of the stopped cluster still run"


@pytest.fixture(scope="module")
def deployed(cluster, tmp_path_factory):
    http_port, grpc_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("multinode") / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(http_port, grpc_port), sort_keys=False))
    deploy = serve_cli(cluster, "deploy", str(config))
    assert deploy.returncode == 0, f"`serve deploy` failed:\n{deploy.stdout}{deploy.stderr}"
    try:
        wait_running(cluster)
        yield Deployed(cluster, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        shutdown = serve_cli(cluster, "shutdown", "-y")
    # `serve shutdown` exits 0 even when it failed; the apps being gone is the evidence.
    deadline = time.monotonic() + 60
    while applications(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert not applications(cluster), f"apps still deployed after `serve shutdown`:\n{shutdown.stderr}"


def test_each_deployment_runs_on_its_node(deployed):
    cluster = deployed.cluster
    node_with = {
        resource: node["node_id"]
        for node in cluster.alive("nodes")
        for resource in node["resources_total"]
        if resource in ("node_a", "node_b")
    }
    assert len(set(node_with.values())) == 2, node_with
    for app in (APP_NAME, BF16_APP):
        placed = {
            actor["class_name"].removeprefix(f"ServeReplica:{app}:"): actor["node_id"]
            for actor in cluster.alive("actors")
            if actor["class_name"].startswith(f"ServeReplica:{app}:")
        }
        assert placed == {name: node_with[node] for name, node in NODE_OF.items()}, app


def complete(url: str, prompt: str) -> dict:
    """A greedy completion over HTTP, exits off (server-wide, and again per request)."""
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(
            {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "sedac": {"disable_exit": True}}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)["choices"][0]


def test_http_and_grpc_answers_across_nodes_equal_hf_greedy(deployed, smollm2):
    prompt = PLAIN_PROMPTS[0]
    choice = complete(deployed.http_url, prompt)
    prompt_ids = smollm2.tokenizer(prompt)["input_ids"]
    assert choice["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert choice["exit_layers"] == [30] * len(choice["token_ids"])  # exits off: all 30 layers ran

    with SedacClient(deployed.grpc_target, timeout_s=120, application=APP_NAME) as client:
        reply = client.generate(CHAT_PROMPTS[0], chat=True, max_tokens=MAX_TOKENS, disable_exit=True)
    prompt_ids = chat_prompt_ids(smollm2.tokenizer, CHAT_PROMPTS[0])
    assert list(reply.token_ids) == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert list(reply.exit_layers) == [30] * len(reply.token_ids)


def test_bf16_pipeline_across_nodes_equals_hf_greedy_in_bf16(deployed, smollm2):
    """bfloat16 end to end: hidden states cross nodes as packed bf16, and the served answer
    equals Hugging Face's own bf16 model (``from_pretrained(dtype=bf16)``), token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    from sedac_ray.model.loading import cache_dir

    hf = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-instruct", dtype=torch.bfloat16)
    for prompt in PLAIN_PROMPTS:
        choice = complete(deployed.http_url + BF16_PREFIX, prompt)
        expected = hf_greedy(hf, smollm2.tokenizer(prompt)["input_ids"], MAX_TOKENS)
        assert choice["token_ids"] == expected, prompt
        assert choice["exit_layers"] == [30] * len(choice["token_ids"])
