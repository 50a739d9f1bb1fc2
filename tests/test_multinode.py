"""The app on a real two-node Ray cluster, deployed the production way (issue 17, item 4).

`ray start --head` and `ray start --address=...` bring up two nodes on this machine, each with
its own custom resource; `serve deploy` places Stage0 and the front door on one node, Stage1 and
the LM head on the other. Answers over HTTP and gRPC must equal Hugging Face's greedy ones, so
hidden states and K/V really cross nodes intact; `serve shutdown` and the cluster's stop must
then leave no process of it behind.
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
NODE_OF = {"FrontDoor": "node_a", "Stage0": "node_a", "Stage1": "node_b", "LMHead": "node_b"}
CPUS_OF = {"FrontDoor": 0.1, "Stage0": 0.4, "Stage1": 0.4, "LMHead": 0.3}
DEPLOY_TIMEOUT_S = 240


@dataclass
class Deployed:
    cluster: CliRayCluster
    http_url: str
    grpc_target: str


def serve_config(http_port: int, grpc_port: int) -> dict:
    """Two stages of SmolLM2 (layers 1..15 and 16..30), each deployment pinned to its node."""
    return {
        "proxy_location": "HeadOnly",  # one proxy; a proxy per node would bind the same ports twice
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "sedac_ray.serve.app:build_app",
                "args": {
                    "model": "smollm2-135m",
                    "device": "cpu",
                    "dtype": "float32",
                    "stages": 2,
                    "exit": {"disable": True},
                },
                "deployments": [
                    {
                        "name": name,
                        "num_replicas": 1,
                        "ray_actor_options": {"num_cpus": CPUS_OF[name], "resources": {node: 1}},
                    }
                    for name, node in NODE_OF.items()
                ],
            }
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


def app_status(cluster: CliRayCluster) -> str:
    return applications(cluster).get(APP_NAME, {}).get("status", "NOT_STARTED")


def wait_running(cluster: CliRayCluster) -> None:
    started = time.monotonic()
    status = app_status(cluster)
    while status != "RUNNING":
        waited = time.monotonic() - started
        if status == "DEPLOY_FAILED" or waited > DEPLOY_TIMEOUT_S:
            report = serve_cli(cluster, "status")
            pytest.fail(
                f"app {APP_NAME} is {status}, not RUNNING, after {waited:.0f} s\n"
                f"`serve status`:\n{report.stdout}{report.stderr}\n{cluster.logs()}"
            )
        time.sleep(2)
        status = app_status(cluster)


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
    placed = {
        actor["class_name"].removeprefix(f"ServeReplica:{APP_NAME}:"): actor["node_id"]
        for actor in cluster.alive("actors")
        if actor["class_name"].startswith("ServeReplica:")
    }
    assert placed == {name: node_with[node] for name, node in NODE_OF.items()}


def test_http_and_grpc_answers_across_nodes_equal_hf_greedy(deployed, smollm2):
    # Exits are off server-wide and, again, per request: a request that names no exit setting
    # currently gets tau=0.99, K=3 however the server is configured (ExitPolicy.with_overrides).
    prompt = PLAIN_PROMPTS[0]
    request = urllib.request.Request(
        f"{deployed.http_url}/v1/completions",
        data=json.dumps(
            {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "sedac": {"disable_exit": True}}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        choice = json.load(reply)["choices"][0]
    prompt_ids = smollm2.tokenizer(prompt)["input_ids"]
    assert choice["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert choice["exit_layers"] == [30] * len(choice["token_ids"])  # exits off: all 30 layers ran

    with SedacClient(deployed.grpc_target, timeout_s=120) as client:
        reply = client.generate(CHAT_PROMPTS[0], chat=True, max_tokens=MAX_TOKENS, disable_exit=True)
    prompt_ids = chat_prompt_ids(smollm2.tokenizer, CHAT_PROMPTS[0])
    assert list(reply.token_ids) == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert list(reply.exit_layers) == [30] * len(reply.token_ids)
