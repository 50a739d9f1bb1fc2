"""Reliability of the served pipeline on a real local Ray: bad input over both protocols, auth,
admission (concurrency limit and KV budget), cancellation, metrics, request ids, and a stage
replica killed under load. The app's limits are in tests/conftest.py (SERVING_ARGS)."""

from __future__ import annotations

import glob
import http.client
import json
import math
import os
import signal
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from sedac_ray.client import SedacClient
from sedac_ray.sampling import SamplingParams
from sedac_ray.serve.generated import sedac_pb2
from sedac_ray.serve.routing import pin
from sedac_ray.serve.transport import PrefillMessage
from tests.conftest import TEST_API_KEY, chat, chat_prompt_ids, hf_greedy, post

pytestmark = pytest.mark.slow
LONG_PROMPT = "Count from 1 to 200, one number per line."
NOT_UTF8 = b'{"prompt": "\xff\xfe"}'

# (path, body or raw bytes, HTTP status, part of the message)
HTTP_CASES = {
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    "unknown role": (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "role must be one of",
    ),
    "bytes not UTF-8": ("/v1/completions", NOT_UTF8, 422, "not valid JSON (UTF-8)"),
    "lone surrogate": ("/v1/completions", b'{"prompt": "\\udc80 hi"}', 400, "not valid UTF-8"),
    "prompt past context": ("/v1/completions", {"prompt": "word " * 9000}, 400, "(max_model_len)"),
    "max_tokens 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be"),
    "max_tokens negative": ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens must be"),
    "max_tokens past context": (
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 9000},
        400,
        "(max_model_len)",
    ),
    "tau NaN": ("/v1/completions", b'{"prompt": "hi", "sedac": {"tau": NaN}}', 400, "tau must be"),
    "tau negative": ("/v1/completions", {"prompt": "hi", "sedac": {"tau": -0.5}}, 400, "tau must be"),
    "tau above 1": ("/v1/completions", {"prompt": "hi", "sedac": {"tau": 1.5}}, 400, "tau must be in (0, 1]"),
    "k 0": ("/v1/completions", {"prompt": "hi", "sedac": {"k": 0}}, 400, "k must be"),
    "min_layer past depth": (
        "/v1/completions",
        {"prompt": "hi", "sedac": {"min_layer": 31}},
        400,
        "min_layer must be in 1..30",
    ),
    "wrong JSON type": ("/v1/completions", {"prompt": "hi", "max_tokens": "6"}, 422, "max_tokens"),
    "unknown field in sedac": ("/v1/completions", {"prompt": "hi", "sedac": {"taux": 1}}, 422, "sedac.taux"),
    "malformed JSON": ("/v1/completions", b'{"prompt": "hi",', 422, "not valid JSON"),
    "oversized body": ("/v1/completions", {"prompt": "x" * 70_000}, 413, "the limit is 65536"),
    "unknown model": ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 400, "is not served here"),
    "no messages": ("/v1/chat/completions", {"messages": []}, 422, "at least 1"),
    "drafts without speculative": (
        "/v1/completions",
        {"prompt": "hi", "sedac": {"stream_drafts": True}},
        400,
        "stream_drafts needs speculative",
    ),
    "speculative not a bool": (
        "/v1/completions",
        {"prompt": "hi", "sedac": {"speculative": 1}},
        422,
        "sedac",
    ),
}

# gRPC: a GenerateRequest (or raw bytes) and part of the INVALID_ARGUMENT message. Negative numbers
# and wrong types cannot be expressed in the typed proto.
GRPC_CASES = {
    "empty prompt": (sedac_pb2.GenerateRequest(prompt=""), "prompt is empty"),
    "unknown role": (
        sedac_pb2.GenerateRequest(messages=[sedac_pb2.ChatMessage(role="wizard", content="hi")]),
        "role must be one of",
    ),
    "bytes not UTF-8": (b"\x0a\x02\xff\xfe", "string fields must be UTF-8"),
    "drafts without speculative": (
        sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(stream_drafts=True)),
        "stream_drafts needs speculative",
    ),
    "prompt past context": (sedac_pb2.GenerateRequest(prompt="word " * 9000), "(max_model_len)"),
    "max_tokens past context": (sedac_pb2.GenerateRequest(prompt="hi", max_tokens=9000), "(max_model_len)"),
    "tau NaN": (
        sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(tau=math.nan)),
        "tau must be",
    ),
    "tau negative": (
        sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(tau=-0.5)),
        "tau must be",
    ),
    "tau above 1": (
        sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(tau=1.5)),
        "tau must be",
    ),
    "k 0": (sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(k=0)), "k must be"),
    "min_layer past depth": (
        sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(min_layer=31)),
        "min_layer must be in 1..30",
    ),
    "oversized message": (sedac_pb2.GenerateRequest(prompt="x" * 70_000), "the limit is 65536"),
    "unknown model": (sedac_pb2.GenerateRequest(prompt="hi", model="gpt-9"), "is not served here"),
}

AUTH = [("authorization", f"Bearer {TEST_API_KEY}")]


def raw_generate(pipeline, payload: bytes | sedac_pb2.GenerateRequest, metadata=AUTH):
    """Generate with the request as given (raw bytes pass through unchecked)."""
    method = pipeline.grpc.channel.unary_unary(
        "/sedac.v1.SedacService/Generate",
        request_serializer=None
        if isinstance(payload, bytes)
        else sedac_pb2.GenerateRequest.SerializeToString,
        response_deserializer=sedac_pb2.GenerateResponse.FromString,
    )
    return method.with_call(payload, metadata=metadata, timeout=120)


def open_stream(pipeline, prompt: str, max_tokens: int):
    """A gRPC stream that has produced its first token (so its KV is held); cancel() ends it."""
    request = SedacClient.request(prompt, chat=True, max_tokens=max_tokens, disable_exit=True)
    call = pipeline.grpc.stub.GenerateStream(request, metadata=AUTH, timeout=300)
    first = next(call)
    assert first.token_id >= 0
    return call


def kv_in_use(pipeline) -> list[tuple[int, int, int]]:
    """(sequences, slots in use, KV bytes) of every stage replica."""
    return [
        (r["sequences"], r["kv_slots_in_use"], r["kv_bytes"])
        for stage in ("Stage0", "Stage1", "Stage2")
        for r in pipeline.local.stats(stage)
    ]


def running_replicas(pipeline, stage: str) -> list[dict]:
    try:
        return pipeline.local.stats(stage)
    except Exception:  # a replica died between listing and asking
        return []


def wait_for_kv_released(pipeline, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            usage = kv_in_use(pipeline)
        except Exception as err:  # a killed replica may still be listed for a moment
            usage = [repr(err)]
        if usage == [(0, 0, 0)] * len(usage):
            return
        assert time.monotonic() < deadline, f"KV still held: {usage}"
        time.sleep(0.5)


def valid_request_is_correct(pipeline, smollm2, prompt: str = "Name a primary color.") -> None:
    choice = chat(pipeline, prompt, max_tokens=6, sedac={"disable_exit": True})["choices"][0]
    assert choice["token_ids"] == hf_greedy(smollm2.model, chat_prompt_ids(smollm2.tokenizer, prompt), 6)


def test_every_invalid_input_is_refused_on_both_protocols_and_others_are_unaffected(pipeline, smollm2):
    with ThreadPoolExecutor(4) as pool:
        # A valid request in flight the whole time: bad neighbours must not disturb it.
        neighbour = pool.submit(chat, pipeline, "Write a haiku about the sea.", max_tokens=24)
        http_answers = {
            name: post(pipeline, path, body, raw=isinstance(body, bytes))
            for name, (path, body, _, _) in HTTP_CASES.items()
        }
        grpc_errors = {}
        for name, (payload, _) in GRPC_CASES.items():
            with pytest.raises(grpc.RpcError) as caught:
                raw_generate(pipeline, payload)
            grpc_errors[name] = caught.value
        neighbour_body = neighbour.result()
    for name, (_, _, status, message) in HTTP_CASES.items():
        code, answer, _ = http_answers[name]
        assert code == status and message in answer["error"]["message"], (name, code, answer)
    for name, (_, message) in GRPC_CASES.items():
        error = grpc_errors[name]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert message in error.details(), (name, error.details())
    assert neighbour_body["choices"][0]["token_ids"]  # chat() also checked its 200
    valid_request_is_correct(pipeline, smollm2)


def test_api_key_is_required_and_never_logged(pipeline, smollm2):
    body = {"prompt": "hi", "max_tokens": 2}
    code, answer, _ = post(pipeline, "/v1/completions", body, api_key=None)
    assert code == 401 and "missing API key" in answer["error"]["message"]
    code, answer, _ = post(pipeline, "/v1/completions", body, api_key="sk-wrong")
    assert code == 401 and answer["error"]["message"] == "invalid API key"
    request = urllib.request.Request(pipeline.http + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401
    with urllib.request.urlopen(pipeline.http + "/healthz", timeout=30) as response:  # probes need no key
        assert response.status == 200
    for metadata in ([], [("authorization", "Bearer sk-wrong")]):
        with pytest.raises(grpc.RpcError) as caught:
            raw_generate(pipeline, sedac_pb2.GenerateRequest(prompt="hi", max_tokens=2), metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    valid_request_is_correct(pipeline, smollm2)
    logs = glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True)
    assert logs, "no Ray logs found to scan"
    for path in logs:
        if os.path.isfile(path):
            with open(path, "rb") as log:
                assert TEST_API_KEY.encode() not in log.read(), f"the API key is written in {path}"


def test_request_ids_are_returned_on_both_protocols(pipeline):
    code, body, headers = post(pipeline, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert code == 200 and body["id"] == "cmpl-" + headers["x-request-id"]
    code, body, headers = post(pipeline, "/v1/completions", {"prompt": ""})
    assert code == 400 and body["error"]["request_id"] == headers["x-request-id"]
    reply, call = raw_generate(pipeline, sedac_pb2.GenerateRequest(prompt="Hello", max_tokens=2))
    trailers = dict(call.trailing_metadata())
    assert reply.request_id and reply.request_id == trailers["request_id"]


def test_concurrency_limit_answers_429_and_resource_exhausted(pipeline, smollm2):
    limit = 16  # SERVING_ARGS["max_concurrent_requests"]
    with ThreadPoolExecutor(limit) as pool:
        streams = list(pool.map(lambda _: open_stream(pipeline, LONG_PROMPT, 64), range(limit)))
    try:
        code, answer, headers = post(pipeline, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 429 and "limit of 16 concurrent requests" in answer["error"]["message"]
        assert headers["retry-after"] == "1"
        with pytest.raises(grpc.RpcError) as caught:
            raw_generate(pipeline, sedac_pb2.GenerateRequest(prompt="hi", max_tokens=2))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(caught.value.trailing_metadata())["retry-after-ms"] == "1000"
    finally:
        for stream in streams:
            stream.cancel()
    wait_for_kv_released(pipeline)  # cancelled streams free their KV in every stage
    valid_request_is_correct(pipeline, smollm2)


def test_kv_budget_refuses_what_cannot_fit_and_admits_again_when_freed(pipeline, smollm2):
    # Each stage replica's KV pool holds 20 sequences of max_model_len=1024 positions.
    wait_for_kv_released(pipeline)  # earlier tests' sequences are freed in the background
    code, answer, _ = post(pipeline, "/v1/completions", {"prompt": "hi", "max_tokens": 1100})
    assert code == 400 and "max_model_len" in answer["error"]["message"], answer
    stage0 = pipeline.local.handle("Stage0")
    held = [
        (
            f"holder-{i}",
            stage0.prefill.remote(PrefillMessage(f"holder-{i}", SamplingParams(), [1, 2], max_length=8)),
        )
        for i in range(20)
    ]
    routes = {seq_id: call.result().route for seq_id, call in held}  # Stage0's pool is full now
    try:
        code, answer, headers = post(pipeline, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert code == 429 and "KV budget" in answer["error"]["message"] and "retry-after" in headers
        with pytest.raises(grpc.RpcError) as caught:
            raw_generate(pipeline, sedac_pb2.GenerateRequest(prompt="hi", max_tokens=4))
        assert (
            caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "KV budget" in caught.value.details()
        )
    finally:
        for seq_id, route in routes.items():
            for stage, replica in enumerate(route):
                handle = pipeline.local.handle(f"Stage{stage}").options(session_id=pin(replica))
                handle.release.remote([seq_id]).result()
    wait_for_kv_released(pipeline)
    assert chat(pipeline, "Say hi.", max_tokens=400)["choices"][0]["finish_reason"] == "stop"


def test_cancelled_streams_do_not_disturb_the_requests_batched_with_them(pipeline, smollm2):
    """Cancelled rows still travel in merged stage messages; they must fail alone. The others are
    streams, which cannot be retried once they have sent a token, so any spill-over shows. (The
    race that once failed whole messages is timing-dependent; benchmarks/soak.py exposes it.)"""
    prompts = [f"List {n} fruits." for n in (2, 3, 4, 5)]

    def stream_tokens(prompt: str) -> list[int] | str:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "stream": True}
        code, text, _ = post(pipeline, "/v1/chat/completions", {**body, "sedac": {"disable_exit": True}})
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        errors = [e["error"] for e in events if "error" in e]
        return str(errors) if errors else [e["choices"][0]["token_id"] for e in events]

    def cancel_early(prompt: str) -> None:
        open_stream(pipeline, prompt, 64).cancel()

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_tokens, p) for p in prompts]
        for _ in range(3):
            list(pool.map(cancel_early, prompts))
        for prompt, stream in zip(prompts, streams, strict=True):
            expected = hf_greedy(smollm2.model, chat_prompt_ids(smollm2.tokenizer, prompt), 24)
            assert stream.result() == expected, prompt
    wait_for_kv_released(pipeline)


def test_http_client_disconnect_frees_kv(pipeline):
    url = urllib.parse.urlparse(pipeline.http)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 500, "stream": True}
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"content-type": "application/json", "authorization": f"Bearer {TEST_API_KEY}"},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert any(sequences for sequences, _, _ in kv_in_use(pipeline))  # generating now
    connection.close()  # hang up mid-stream
    wait_for_kv_released(pipeline)


def test_metrics_endpoint_exposes_the_named_series(pipeline):
    post(pipeline, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "sedac": {"tau": 0.97}})
    post(pipeline, "/v1/completions", {"prompt": ""})
    speculative = {"tau": 0.97, "k": 3, "speculative": True}
    status, body, _ = post(
        pipeline, "/v1/completions", {"prompt": "The sea is", "max_tokens": 16, "sedac": speculative}
    )
    assert status == 200 and body["usage"]["speculative"]["drafts"] > 0, body
    wanted = [
        "ray_sedac_requests_total",
        "ray_sedac_errors_total",
        "ray_sedac_generated_tokens_total",
        "ray_sedac_exit_layer_bucket",
        "ray_sedac_layers_saved_fraction",
        "ray_sedac_request_latency_seconds_bucket",
        "ray_sedac_stage_batch_rows_bucket",
        "ray_sedac_stage_queue_depth",
        "ray_sedac_kv_bytes",
        "ray_sedac_kv_sequences",
        "ray_sedac_speculative_drafts_total",
        "ray_sedac_speculative_verifications_total",
    ]
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(pipeline.local.metrics_url, timeout=10) as response:
            text = response.read().decode()
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"metrics missing: {missing}"
        time.sleep(1)
    errors = [line for line in text.splitlines() if line.startswith("ray_sedac_errors_total{")]
    assert any('code="400"' in line and 'protocol="http"' in line for line in errors), errors


def stream_text(pipeline, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Token ids and text of an SSE chat stream (exits off); an error event fails the test."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}
    code, text, _ = post(pipeline, "/v1/chat/completions", {**body, "sedac": {"disable_exit": True}})
    assert code == 200, text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert not errors, errors
    choices = [e["choices"][0] for e in events if e.get("choices")]
    return [c["token_id"] for c in choices if "token_id" in c], "".join(
        c["delta"].get("content", "") for c in choices
    )


def grpc_stream_text(pipeline, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Token ids and text of a gRPC ``GenerateStream`` (exits off); an error status fails the test."""
    chunks = list(pipeline.grpc.stream(prompt, chat=True, max_tokens=max_tokens, disable_exit=True))
    return [c.token_id for c in chunks], "".join(c.text for c in chunks)


def streams_survive(
    pipeline, smollm2, disrupt, count: int = 16, max_tokens: int = 64, stream=stream_text
) -> None:
    """``count`` streams (SSE, or gRPC with ``stream=grpc_stream_text``; exits off) run while
    ``disrupt()`` acts once they are mid-answer: every stream must end normally, with exactly
    full-depth greedy decoding."""
    prompts = [f"Count from {100 * i} to {100 * i + 200}, one number per line." for i in range(count)]
    expected = {
        p: hf_greedy(smollm2.model, chat_prompt_ids(smollm2.tokenizer, p), max_tokens) for p in prompts
    }
    with ThreadPoolExecutor(count) as pool:
        before = sum(s["decode_rows"] for s in running_replicas(pipeline, "Stage1"))
        futures = {p: pool.submit(stream, pipeline, p, max_tokens) for p in prompts}
        deadline = time.monotonic() + 120
        while sum(s["decode_rows"] for s in running_replicas(pipeline, "Stage1")) < before + count:
            assert time.monotonic() < deadline, "the streams never got going"
            time.sleep(0.2)
        finished = [f for f in futures.values() if f.done()]
        for future in finished:
            future.result()  # a stream that failed before the disruption shows its error here
        assert not finished, f"{len(finished)} streams ended before the disruption"
        disrupt()
        for prompt, future in futures.items():
            tokens, text = future.result(timeout=300)
            assert tokens == expected[prompt], prompt
            assert text == smollm2.tokenizer.decode(expected[prompt], skip_special_tokens=True)
    wait_for_kv_released(pipeline, timeout_s=60)


@pytest.mark.parametrize("stream", [stream_text, grpc_stream_text], ids=["sse", "grpc"])
def test_streams_survive_a_stage_replica_killed_mid_answer(pipeline, smollm2, stream):
    """SIGKILL one of Stage1's two replicas while 16 streams (SSE, or gRPC GenerateStream) are
    mid-answer: the sequences it held are replayed on the other (prompt plus committed tokens), so
    every stream ends normally with full-depth greedy text; Serve then brings the replica back."""
    deadline = time.monotonic() + 120  # the previous kill's replica may still be coming back
    while len(replicas := running_replicas(pipeline, "Stage1")) < 2:
        assert time.monotonic() < deadline, replicas
        time.sleep(1)
    streams_survive(pipeline, smollm2, lambda: os.kill(replicas[0]["pid"], signal.SIGKILL), stream=stream)
    deadline = time.monotonic() + 120  # Serve replaces the replica
    while len(running_replicas(pipeline, "Stage1")) < 2:
        assert time.monotonic() < deadline, "Stage1 did not get its second replica back"
        time.sleep(1)


def test_streams_survive_a_stage_scaled_down_mid_answer(pipeline, smollm2):
    """Stage1 scales from 2 replicas to 1 while 16 streams are mid-answer (then back to 2): the
    removed replica's sequences are replayed on the other, and every stream ends normally."""

    def scale(replicas: int) -> None:
        pipeline.local.deploy(pipeline.args, replicas={"Stage1": replicas})

    try:
        streams_survive(pipeline, smollm2, lambda: threading.Thread(target=scale, args=(1,)).start())
        assert len(running_replicas(pipeline, "Stage1")) == 1
    finally:
        scale(2)
        deadline = time.monotonic() + 120
        while len(running_replicas(pipeline, "Stage1")) < 2:
            assert time.monotonic() < deadline, "Stage1 did not scale back to 2 replicas"
            time.sleep(1)
