"""The Ray Serve pipeline on a real local Ray (2 CPUs): HTTP and gRPC against HF and the engine,
sticky routing with a stage of 2 replicas, streaming, bad input, and KV release."""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from sedac_ray import Engine, ExitPolicy
from sedac_ray.client import SedacClient
from tests.conftest import CHAT_PROMPTS, hf_greedy

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(smollm2):
    """Three stages over 30 layers (1..10, 11..20, 21..30), Stage1 with two replicas."""
    import ray
    from ray import serve

    from sedac_ray.serve.app import build_app

    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={
            "port": grpc_port,
            "grpc_servicer_functions": [
                "sedac_ray.serve.generated.sedac_pb2_grpc.add_SedacServiceServicer_to_server"
            ],
        },
    )
    args = {"stages": 3, "stage_replicas": [1, 2, 1], "replica_cpus": 0.1, "exit": {"tau": 0.99, "k": 3}}
    serve.run(build_app(args), name="sedac", route_prefix="/")
    client = SedacClient(f"127.0.0.1:{grpc_port}", timeout_s=120)
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": client, "serve": serve}
    client.close()
    serve.shutdown()
    ray.shutdown()


def post(pipeline, path: str, body, raw: bool = False) -> tuple[int, dict | str]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(
        pipeline["http"] + path, data=data, headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            return response.status, text if "event-stream" in response.headers[
                "content-type"
            ] else json.loads(text)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def chat(pipeline, prompt: str, **extra) -> dict:
    status, body = post(
        pipeline, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **extra}
    )
    assert status == 200, body
    return body


def stage_stats(pipeline, stage: str) -> list[dict]:
    return pipeline["serve"].get_deployment_handle(stage, app_name="sedac").broadcast("stats").results()


def test_http_without_exits_equals_hf_generate(pipeline, smollm2):
    for prompt in CHAT_PROMPTS:
        body = chat(pipeline, prompt, max_tokens=MAX_TOKENS, sedac={"disable_exit": True})
        choice = body["choices"][0]
        prompt_ids = smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        assert choice["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
        assert choice["exit_layers"] == [30] * len(choice["token_ids"])
        assert body["usage"]["prompt_tokens"] == len(prompt_ids) and body["usage"]["mean_layers"] == 30
    status, body = post(
        pipeline, "/v1/completions", {"prompt": "The three primary colors are", "max_tokens": 8}
    )
    assert status == 200 and body["object"] == "text_completion" and body["choices"][0]["text"]


def test_pipeline_with_exits_equals_engine(pipeline, smollm2):
    engine = Engine(smollm2)
    exit_stages = set()
    for tau, k in [(0.97, 3), (0.96, 2)]:
        for prompt in CHAT_PROMPTS:
            choice = chat(pipeline, prompt, max_tokens=MAX_TOKENS, sedac={"tau": tau, "k": k})["choices"][0]
            reference = engine.generate(
                prompt, max_new_tokens=MAX_TOKENS, chat=True, policy=ExitPolicy(tau, k=k)
            )[0]
            assert (choice["token_ids"], choice["exit_layers"]) == (
                reference.token_ids,
                reference.exit_layers,
            )
            exit_stages.update((layer - 1) // 10 for layer in choice["exit_layers"] if layer < 30)
    assert exit_stages >= {0, 1}  # tokens left the pipeline early from stage 0 and from stage 1


def test_grpc_matches_hf_and_streams_the_same_tokens(pipeline, smollm2):
    client = pipeline["grpc"]
    reply = client.generate(CHAT_PROMPTS[0], chat=True, max_tokens=MAX_TOKENS, disable_exit=True)
    prompt_ids = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPTS[0]}], add_generation_prompt=True, return_dict=False
    )
    assert list(reply.token_ids) == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert reply.text == "The capital of France is Paris." and reply.finish_reason == "stop"
    assert reply.num_layers == 30 and list(reply.exit_layers) == [30] * len(reply.token_ids)
    chunks = list(client.stream(CHAT_PROMPTS[1], chat=True, max_tokens=MAX_TOKENS, tau=0.97, k=3))
    whole = client.generate(CHAT_PROMPTS[1], chat=True, max_tokens=MAX_TOKENS, tau=0.97, k=3)
    engine = Engine(smollm2, ExitPolicy(0.97, k=3)).generate(
        CHAT_PROMPTS[1], max_new_tokens=MAX_TOKENS, chat=True
    )
    assert (list(whole.token_ids), list(whole.exit_layers)) == (engine[0].token_ids, engine[0].exit_layers)
    assert min(whole.exit_layers) < 30
    assert [c.token_id for c in chunks] == list(whole.token_ids)
    assert [c.exit_layer for c in chunks] == list(whole.exit_layers)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason and not any(c.finish_reason for c in chunks[:-1])


def test_http_stream_is_server_sent_events(pipeline):
    status, stream = post(
        pipeline,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": CHAT_PROMPTS[0]}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
        },
    )
    assert status == 200
    events = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["delta"]["content"] for c in chunks) == "The capital of France is Paris."
    assert chunks[-1]["finish_reason"] == "stop"


def test_concurrent_requests_with_two_replicas_of_a_stage(pipeline, smollm2):
    prompts = [f"Count from {i} to {i + 4}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        bodies = list(
            pool.map(
                lambda p: chat(pipeline, p, max_tokens=MAX_TOKENS, sedac={"disable_exit": True}), prompts
            )
        )
    for prompt, body in zip(prompts, bodies, strict=True):
        prompt_ids = smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        assert body["choices"][0]["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS), prompt
    replicas = stage_stats(pipeline, "Stage1")
    assert len(replicas) == 2 and all(r["admitted"] > 0 for r in replicas), replicas  # both held sequences
    for stage in ("Stage0", "Stage1", "Stage2"):  # every finished sequence released its KV
        stats = stage_stats(pipeline, stage)
        assert all(r["sequences"] == 0 and r["kv_slots_in_use"] == 0 for r in stats), stats


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 9000}, 400, "context of 8192"),
        ("/v1/completions", {"prompt": "hi", "sedac": {"tau": 1.5}}, 400, "tau must be in (0, 1]"),
        ("/v1/completions", {"prompt": "hi", "sedac": {"k": 0}}, 400, "k must be"),
        ("/v1/completions", {"prompt": "hi", "sedac": {"min_layer": 31}}, 400, "min_layer must be in 1..30"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 400, "is not served here"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "6"}, 422, "valid integer"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "role must be one of",
        ),
        ("/v1/chat/completions", {"messages": []}, 422, "at least 1"),
    ],
)
def test_bad_http_input_is_refused_clearly(pipeline, path, body, status, message):
    code, answer = post(pipeline, path, body)
    assert code == status and message in json.dumps(answer), answer


def test_malformed_json_is_a_422(pipeline):
    code, answer = post(pipeline, "/v1/completions", b'{"prompt": "hi",', raw=True)
    assert code == 422 and "json" in json.dumps(answer).lower()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="hi", tau=math.nan), "tau must be"),
        (dict(prompt="hi", k=0), "k must be"),
        (dict(prompt="hi", max_tokens=9000), "context of 8192"),
    ],
)
def test_bad_grpc_input_is_invalid_argument_and_server_keeps_serving(pipeline, kwargs, message):
    client = pipeline["grpc"]
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(prompt, **kwargs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    assert client.generate("Say hi.", chat=True, max_tokens=4).token_ids  # still serving


def test_models_and_health(pipeline):
    with urllib.request.urlopen(pipeline["http"] + "/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "smollm2-135m"
    with urllib.request.urlopen(pipeline["http"] + "/healthz", timeout=30) as response:
        assert json.loads(response.read()) == {
            "status": "ok",
            "model": "smollm2-135m",
            "num_layers": 30,
            "stages": 3,
        }
