"""The Ray Serve pipeline on a real local Ray (2 CPUs): HTTP and gRPC against HF and the engine,
sticky routing with a stage of 2 replicas, streaming, and KV release. Bad input, limits, auth,
metrics and faults are in test_reliability.py."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from sedac_ray import Engine, ExitPolicy
from tests.conftest import CHAT_PROMPTS, TEST_API_KEY, chat, chat_prompt_ids, hf_greedy, post

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


def test_http_without_exits_equals_hf_generate(pipeline, smollm2):
    for prompt in CHAT_PROMPTS:
        body = chat(pipeline, prompt, max_tokens=MAX_TOKENS, sedac={"disable_exit": True})
        choice = body["choices"][0]
        prompt_ids = chat_prompt_ids(smollm2.tokenizer, prompt)
        assert choice["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
        assert choice["exit_layers"] == [30] * len(choice["token_ids"])
        assert body["usage"]["prompt_tokens"] == len(prompt_ids) and body["usage"]["mean_layers"] == 30
    status, body, _ = post(
        pipeline, "/v1/completions", {"prompt": "The three primary colors are", "max_tokens": 8}
    )
    assert status == 200 and body["object"] == "text_completion" and body["choices"][0]["text"]


def test_pipeline_with_exits_equals_engine(pipeline, smollm2):
    """Exits on, with exit adapters at layers 5..15 in both: the stages and the LM head read out
    exited tokens exactly as the engine does."""
    engine = Engine(smollm2, adapters=pipeline.args["exit_adapters"])
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


def test_pipeline_with_a_probe_policy_equals_engine(pipeline, smollm2):
    """Per-request V7+probe policies: every stage gates exits on the model's calibrated exit probes
    as the engine does (exit adapters on in both), so tokens and exit layers are equal."""
    engine = Engine(smollm2, adapters=pipeline.args["exit_adapters"])
    assert engine.probes is not None  # the shipped calibration's probes, as the stages load them
    exit_stages, gated = set(), False
    for tau, k, probe in [(0.9, 2, 0.5), (0.95, 2, 0.7)]:
        for prompt in CHAT_PROMPTS:
            sedac = {"tau": tau, "k": k, "probe": probe}
            choice = chat(pipeline, prompt, max_tokens=MAX_TOKENS, sedac=sedac)["choices"][0]
            policy = ExitPolicy(tau, k=k, probe=probe)
            reference = engine.generate(prompt, max_new_tokens=MAX_TOKENS, chat=True, policy=policy)[0]
            assert (choice["token_ids"], choice["exit_layers"]) == (
                reference.token_ids,
                reference.exit_layers,
            )
            exit_stages.update((layer - 1) // 10 for layer in choice["exit_layers"] if layer < 30)
            if not gated:  # without the probe gate, the same V7 rule exits elsewhere
                ungated = engine.generate(
                    prompt, max_new_tokens=MAX_TOKENS, chat=True, policy=ExitPolicy(tau, k=k)
                )
                gated = ungated[0].exit_layers != reference.exit_layers
    assert exit_stages == {0, 1, 2}  # probe-gated exits in every stage
    assert gated  # the probe gate changed exits: the comparison covers it


def test_grpc_matches_hf_and_streams_the_same_tokens(pipeline, smollm2):
    client = pipeline.grpc
    reply = client.generate(CHAT_PROMPTS[0], chat=True, max_tokens=MAX_TOKENS, disable_exit=True)
    prompt_ids = chat_prompt_ids(smollm2.tokenizer, CHAT_PROMPTS[0])
    assert list(reply.token_ids) == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    assert reply.text == "The capital of France is Paris." and reply.finish_reason == "stop"
    assert reply.num_layers == 30 and list(reply.exit_layers) == [30] * len(reply.token_ids)
    chunks = list(client.stream(CHAT_PROMPTS[1], chat=True, max_tokens=MAX_TOKENS, tau=0.97, k=3))
    whole = client.generate(CHAT_PROMPTS[1], chat=True, max_tokens=MAX_TOKENS, tau=0.97, k=3)
    engine = Engine(smollm2, ExitPolicy(0.97, k=3), adapters=pipeline.args["exit_adapters"]).generate(
        CHAT_PROMPTS[1], max_new_tokens=MAX_TOKENS, chat=True
    )
    assert (list(whole.token_ids), list(whole.exit_layers)) == (engine[0].token_ids, engine[0].exit_layers)
    assert min(whole.exit_layers) < 30
    assert [c.token_id for c in chunks] == list(whole.token_ids)
    assert [c.exit_layer for c in chunks] == list(whole.exit_layers)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason and not any(c.finish_reason for c in chunks[:-1])


def test_http_stream_is_server_sent_events(pipeline):
    status, stream, _ = post(
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
        prompt_ids = chat_prompt_ids(smollm2.tokenizer, prompt)
        assert body["choices"][0]["token_ids"] == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS), prompt
    replicas = pipeline.local.stats("Stage1")
    assert len(replicas) == 2 and all(r["admitted"] > 0 for r in replicas), replicas  # both held sequences
    for stage in ("Stage0", "Stage1", "Stage2"):  # every finished sequence released its KV
        stats = pipeline.local.stats(stage)
        assert all(r["sequences"] == 0 and r["kv_slots_in_use"] == 0 for r in stats), stats


def test_models_and_health(pipeline):
    models = urllib.request.Request(
        pipeline.http + "/v1/models", headers={"authorization": f"Bearer {TEST_API_KEY}"}
    )
    with urllib.request.urlopen(models, timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "smollm2-135m"
    with urllib.request.urlopen(pipeline.http + "/healthz", timeout=30) as response:  # no key needed
        assert json.loads(response.read()) == {
            "status": "ok",
            "model": "smollm2-135m",
            "num_layers": 30,
            "stages": 3,
        }


# ---- lossless speculative mode across the stages ------------------------------------------------

SPECULATIVE = {"speculative": True, "tau": 0.97, "k": 3}  # drafts often; many drafts prove wrong
FULL_DEPTH_DRAFTS = {"speculative": True, "disable_exit": True}  # drafts only from the draft head


def test_speculative_pipeline_equals_hf_greedy_with_drafts_accepted_and_rolled_back(pipeline, smollm2):
    """At the admission limit (16 requests), every one drafting: one verification poll per
    sequence keeps the last stage's request slots free for the steps that answer them."""
    prompts = ([*CHAT_PROMPTS, "Count from 1 to 5.", "Name three fruits."] * 4)[:16]
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, so speculative rows share batches
        bodies = list(
            pool.map(lambda p: chat(pipeline, p, max_tokens=MAX_TOKENS, sedac=SPECULATIVE), prompts)
        )
    references = {
        p: hf_greedy(smollm2.model, chat_prompt_ids(smollm2.tokenizer, p), MAX_TOKENS) for p in set(prompts)
    }
    totals = dict.fromkeys(("drafts", "accepted", "rolled_back", "verifications", "rollbacks", "direct"), 0)
    for prompt, body in zip(prompts, bodies, strict=True):
        choice, stats = body["choices"][0], body["usage"]["speculative"]
        assert choice["token_ids"] == references[prompt], prompt
        # The first token comes from prefill; every other one ran full depth or was verified.
        assert len(choice["token_ids"]) == 1 + stats["direct"] + stats["accepted"] + stats["rollbacks"]
        assert stats["drafts"] == stats["accepted"] + stats["rolled_back"]
        for name in totals:
            totals[name] += stats[name]
    assert totals["accepted"] > 0 and totals["rollbacks"] > 0, totals  # drafts kept and rolled back
    assert any(layer < 30 for body in bodies for layer in body["choices"][0]["exit_layers"])
    for stage in ("Stage0", "Stage1", "Stage2"):  # rolled-back sequences released their KV too
        stats = pipeline.local.stats(stage)
        assert all(r["sequences"] == 0 and r["kv_slots_in_use"] == 0 for r in stats), stats


def test_speculative_pipeline_drafts_with_the_draft_head_and_equals_hf_greedy(pipeline, smollm2):
    """Exits off (the speculation file's chosen draft depth: full): the last stage reads rows out
    with the draft head and answers with drafts, whose full-head verification follows the reply
    and comes back with the next; a batch with a row below the gate is read out by the full head
    at once. One request at a time (batches of one row: drafts are made, accepted, and gated),
    then all at once (batches that mostly need the full head): every answer equals HF greedy."""
    from sedac_ray.draft_head import find_speculation

    assert find_speculation("smollm2-135m") is not None  # the packaged file the replicas load
    prompts = [*CHAT_PROMPTS, "Count from 1 to 5.", "Name three fruits.", "What is 2 + 2?"]
    references = [
        hf_greedy(smollm2.model, chat_prompt_ids(smollm2.tokenizer, p), MAX_TOKENS) for p in prompts
    ]

    def speculate(prompt: str) -> dict:
        return chat(pipeline, prompt, max_tokens=MAX_TOKENS, sedac=FULL_DEPTH_DRAFTS)

    before = _summed(pipeline.local.stats("Stage2"))
    alone = [speculate(p) for p in prompts[:4]]
    after = _summed(pipeline.local.stats("Stage2"))
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, so speculative rows share batches
        together = list(pool.map(speculate, prompts))
    totals = dict.fromkeys(("drafts", "accepted", "rollbacks", "direct"), 0)
    for body, reference in [*zip(alone, references, strict=False), *zip(together, references, strict=True)]:
        choice, stats = body["choices"][0], body["usage"]["speculative"]
        assert choice["token_ids"] == reference
        assert choice["exit_layers"] == [30] * len(choice["token_ids"])  # every draft ran full depth
        assert len(choice["token_ids"]) == 1 + stats["direct"] + stats["accepted"] + stats["rollbacks"]
    for body in alone:
        for name in totals:
            totals[name] += body["usage"]["speculative"][name]
    # Drafts made at the last stage (void ones too), and tokens below the gate read out by the
    # full head at once: the draft head both drafted and gated.
    drafted = after["drafted_here"] - before["drafted_here"]
    assert drafted >= totals["drafts"] > 0 and totals["accepted"] > 0 and totals["direct"] > 0, totals


def _summed(replicas: list[dict]) -> dict:
    return {key: sum(r[key] for r in replicas) for key in replicas[0] if isinstance(replicas[0][key], int)}


def test_speculative_grpc_stream_marks_drafts_and_commits_only_verified_tokens(pipeline, smollm2):
    client = pipeline.grpc
    options = dict(chat=True, max_tokens=MAX_TOKENS, tau=0.97, k=3, speculative=True)
    chunks = list(client.stream(CHAT_PROMPTS[2], stream_drafts=True, **options))
    whole = client.generate(CHAT_PROMPTS[2], **options)
    prompt_ids = chat_prompt_ids(smollm2.tokenizer, CHAT_PROMPTS[2])
    assert list(whole.token_ids) == hf_greedy(smollm2.model, prompt_ids, MAX_TOKENS)
    verified = [c for c in chunks if not c.draft]
    drafts = [c for c in chunks if c.draft]
    assert [c.token_id for c in verified] == list(whole.token_ids)
    assert [c.index for c in verified] == list(range(len(whole.token_ids)))
    assert "".join(c.text for c in verified) == whole.text
    # Drafts from early exits, and (draft head) from full depth, whose full head runs later.
    assert drafts and all(not c.finish_reason for c in drafts)
    last = verified[-1].speculative
    assert last.drafts == len(drafts) and whole.speculative.drafts > 0  # timing decides how many
    assert last.accepted + last.rollbacks == last.verifications
    without_drafts = list(client.stream(CHAT_PROMPTS[2], **options))
    assert [c.token_id for c in without_drafts] == list(whole.token_ids)
    assert not any(c.draft for c in without_drafts)
