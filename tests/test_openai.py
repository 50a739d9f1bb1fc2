"""OpenAI compatibility: every field the official client sends is honoured or refused by name.

Unit tests (no Ray) cover body parsing, sampling with penalties and logprobs against independent
recomputations, incremental detokenisation against a full decode, and the request lifecycle. The
slow tests drive the served pipeline with the real ``openai`` client and compare with Hugging
Face forward passes.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
import torch

from sedac_ray.completion import Completion
from sedac_ray.model.loading import load_tokenizer_and_config
from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams, TokenLogprobs, choose_tokens, token_logprobs
from sedac_ray.serve.errors import InvalidRequest, MalformedRequest, Overloaded
from sedac_ray.serve.openai_protocol import OpenAIResponses, build_arguments, parse_body
from sedac_ray.serve.requests import MAX_CHOICES, RequestBuilder
from sedac_ray.speculative import SpeculativeStats
from tests.conftest import CHAT_PROMPTS, TEST_API_KEY, chat_prompt_ids, hf_greedy

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_and_config("smollm2-135m")[0]


@pytest.fixture(scope="module")
def builder(tokenizer) -> RequestBuilder:
    from sedac_ray.policy import ExitPolicy

    return RequestBuilder(
        tokenizer,
        model_name="smollm2-135m",
        num_layers=30,
        max_context=8192,
        default_policy=ExitPolicy(0.99, k=3),
        default_max_tokens=16,
    )


# ---- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("logit_bias", {"42": 5}),
        ("response_format", {"type": "json_object"}),
        ("parallel_tool_calls", True),
        ("service_tier", "auto"),
        ("reasoning_effort", "low"),
        ("metadata", {"a": "b"}),
        ("store", True),
        ("modalities", ["text"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("best_of", 3),
        ("made_up_field", 1),
    ],
)
def test_unsupported_chat_fields_are_refused_by_name(field, value):
    with pytest.raises(InvalidRequest, match=field) as caught:
        parse_body({"messages": MESSAGES, field: value}, chat=True)
    assert caught.value.http_status == 400


@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "end"), ("best_of", 2)])
def test_unsupported_completion_fields_are_refused_by_name(field, value):
    with pytest.raises(InvalidRequest, match=field):
        parse_body({"prompt": "hi", field: value}, chat=False)
    with pytest.raises(InvalidRequest, match="max_completion_tokens"):  # a chat-only field
        parse_body({"prompt": "hi", "max_completion_tokens": 3}, chat=False)


def test_fields_that_ask_for_nothing_are_accepted():
    body = parse_body(
        {
            "messages": MESSAGES,
            "tools": None,
            "logit_bias": {},
            "store": False,
            "response_format": {"type": "text"},
            "best_of": 1,
            "user": "someone",
        },
        chat=True,
    )
    assert body.user == "someone"
    parse_body({"prompt": "hi", "echo": False, "n": 2, "best_of": 2}, chat=False)


def test_chat_arguments_map_to_the_request():
    body = parse_body(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
            "max_completion_tokens": 7,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -1,
            "stop": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        chat=True,
    )
    arguments = build_arguments(body, chat=True)
    assert arguments["messages"] == [{"role": "user", "content": "a\nb"}]
    assert (arguments["max_tokens"], arguments["n"], arguments["logprobs"]) == (7, 2, 3)
    assert (arguments["presence_penalty"], arguments["frequency_penalty"], arguments["stop"]) == (
        0.5,
        -1,
        ["x"],
    )
    assert build_arguments(parse_body({"messages": MESSAGES, "logprobs": True}, True), True)["logprobs"] == 0
    assert build_arguments(parse_body({"messages": MESSAGES}, True), True)["logprobs"] is None
    assert build_arguments(parse_body({"prompt": "p", "logprobs": 2}, False), False)["logprobs"] == 2


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": 3, "max_completion_tokens": 4}, "disagree"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"stream_options": {"include_usage": True}}, "only allowed with stream"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, r"messages\[0\]\.name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "only text parts",
        ),
    ],
)
def test_inconsistent_chat_bodies_are_refused(body, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        build_arguments(parse_body({"messages": MESSAGES, **body}, chat=True), chat=True)
    assert caught.value.http_status == 400


def test_wrong_types_stay_malformed():
    with pytest.raises(MalformedRequest, match="n"):
        parse_body({"messages": MESSAGES, "n": "2"}, chat=True)
    with pytest.raises(MalformedRequest, match="stream_options.continuous_usage_stats"):
        parse_body(
            {"messages": MESSAGES, "stream": True, "stream_options": {"continuous_usage_stats": True}}, True
        )
    with pytest.raises(MalformedRequest, match="JSON object"):
        parse_body([1, 2], chat=True)


def test_builder_checks_the_new_fields(builder):
    request = builder.build(messages=MESSAGES, n=3, seed=5, presence_penalty=1, logprobs=2)
    assert request.n == 3 and request.sampling.logprobs == 2
    seeds = [request.for_choice(i).sampling.seed for i in range(3)]
    assert seeds[0] == 5 and len(set(seeds)) == 3  # choice 0 is the plain request
    for arguments, message in [
        ({"n": 0}, "n must be"),
        ({"n": MAX_CHOICES + 1}, "n must be"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"logprobs": 21}, "top_logprobs must be"),
        (
            {"presence_penalty": 1, "exit_overrides": {"speculative": True}},
            "not supported with sedac.speculative",
        ),
        ({"logprobs": 0, "exit_overrides": {"speculative": True}}, "logprobs are not supported"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            builder.build(messages=MESSAGES, **arguments)


def test_a_probe_threshold_is_served_only_where_the_stages_hold_probes(builder, tokenizer):
    body = parse_body({"messages": MESSAGES, "sedac": {"probe": 0.9, "min_layer": 8}}, chat=True)
    overrides = build_arguments(body, chat=True)["exit_overrides"]
    assert overrides == {
        "probe": 0.9,
        "min_layer": 8,
        "disable_exit": False,
        "speculative": False,
        "stream_drafts": False,
    }
    with pytest.raises(InvalidRequest, match="needs exit probes, and smollm2-135m has none here"):
        builder.build(messages=MESSAGES, exit_overrides=overrides)
    with_probes = RequestBuilder(
        tokenizer, "smollm2-135m", 30, 8192, builder.default_policy, 16, exit_probes=True
    )
    request = with_probes.build(messages=MESSAGES, exit_overrides=overrides)
    assert request.policy == ExitPolicy(0.99, k=3, min_layer=8, probe=0.9)  # the server's tau, K kept
    with pytest.raises(InvalidRequest, match="probe must be a threshold in"):
        with_probes.build(messages=MESSAGES, exit_overrides={"probe": 1.5})


# ---- sampling: penalties and logprobs against independent recomputation ---------------------


def test_penalties_subtract_openai_terms_from_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    history = [3, 7, 3, 3, 9]
    params = [
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.7).for_step(history),
        SamplingParams().for_step(history),  # no penalty: carries no history
    ]
    assert params[1].generated == ()
    expected = logits[0].clone()
    for token, count in Counter(history).items():  # the OpenAI formula, written out
        expected[token] -= count * 0.7 + 0.4
    chosen = choose_tokens(logits, params, [0, 0])
    assert chosen == [int(expected.argmax()), int(logits[1].argmax())]
    forced = logits.clone()
    forced[0, 3] = 10.0  # the top token, until 30 uses (penalty 30 * 2 + 2) push it down
    heavy = SamplingParams(frequency_penalty=2.0, presence_penalty=2.0).for_step([3] * 30)
    assert choose_tokens(forced[:1], [heavy], [0]) != [3]
    assert choose_tokens(forced[:1], [SamplingParams()], [0]) == [3]


def test_token_logprobs_are_log_softmax_of_the_raw_logits():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=0)]
    tokens = [5, 6, 7]
    answers = token_logprobs(logits, tokens, params)
    assert answers[1] is None
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert answers[0].logprob == pytest.approx(float(reference[0, 5]), abs=1e-5)
    assert [t for t, _ in answers[0].top] == reference[0].argsort(descending=True)[:2].tolist()
    assert answers[2].top == [] and answers[2].logprob == pytest.approx(float(reference[2, 7]), abs=1e-5)


# ---- incremental detokenisation ---------------------------------------------------------------


def test_completion_text_equals_a_full_decode_at_every_length(tokenizer):
    rng = random.Random(0)
    sequences = [tokenizer("Héllo wörld: 日本語 🎉 naïve\n\tcode()")["input_ids"]]
    sequences += [[rng.randrange(49152) for _ in range(30)] + [0, 1, 2] for _ in range(20)]
    for ids in sequences:
        completion = Completion(tokenizer, 1000, set())
        for length, token in enumerate(ids, start=1):
            completion.add(token, 30)
            assert completion.text == tokenizer.decode(ids[:length], skip_special_tokens=True)


def test_stop_string_across_a_split_character(tokenizer):
    ids = tokenizer("ab🎉日本")["input_ids"]
    completion = Completion(tokenizer, 1000, set(), ["本"])
    streamed = ""
    for token in ids:
        completion.add(token, 30)
        streamed += completion.new_text()
    assert completion.finish_reason == "stop" and completion.text == "ab🎉日" == streamed


# ---- responses --------------------------------------------------------------------------------


def test_response_shapes(builder, tokenizer):
    request = builder.build(messages=MESSAGES, n=2)
    completions = []
    for tokens in ([42, 43], [44]):
        completion = Completion(tokenizer, 5, set())
        for token in tokens:
            completion.add(token, 30, TokenLogprobs(-0.5, [(token, -0.5), (7, -1.5)]))
        completion.speculative = SpeculativeStats(drafts=len(tokens))
        completions.append(completion)
    chat = OpenAIResponses(tokenizer, "m", 30, True, "rid", 1)
    body = chat.response(request, completions)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["speculative"]["drafts"] == 3
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([42]), tokenizer.decode([43])]
    assert content[0]["top_logprobs"][1]["logprob"] == -1.5
    text = OpenAIResponses(tokenizer, "m", 30, False, "rid", 1).response(request, completions)
    logprobs = text["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["text_offset"] == [0, len(logprobs["tokens"][0])]
    assert text["id"] == "cmpl-rid" and body["id"] == "chatcmpl-rid"


# ---- the request lifecycle ----------------------------------------------------------------------


class _Door:
    """What RequestScope needs of the front door, recording what it is told."""

    def __init__(self, limit: int = 1):
        self.active, self.limit, self.records = 0, limit, []

    def take_place(self):
        if self.active >= self.limit:
            raise Overloaded("full")
        self.active += 1

    def give_place_back(self):
        self.active -= 1

    def record(self, scope, code):
        self.records.append((code, scope.error.message if scope.error else None))


def test_request_scope_lifecycle(builder):
    from sedac_ray.serve.front_door import RequestScope

    request = builder.build(messages=MESSAGES)

    async def scenarios(door: _Door):
        async with RequestScope(door, "http") as scope:  # success
            scope.admit(request)
            assert door.active == 1
        async with RequestScope(door, "grpc") as failed:  # a failure is kept, not raised
            failed.admit(request)
            raise InvalidRequest("bad")
        assert failed.error.message == "bad" and door.active == 0
        with pytest.raises(asyncio.CancelledError):  # a client that left: re-raised
            async with RequestScope(door, "http") as scope:
                scope.admit(request)
                raise asyncio.CancelledError
        async with RequestScope(door, "http") as first:
            first.admit(request)
            handed = first.hand_off()
        assert door.active == 1  # the stream holds the place
        async with RequestScope(door, "http") as second:  # over the limit
            second.admit(request)
        assert second.error.http_status == 429
        async with handed:
            pass
        handed.release()  # a second release gives nothing back
        assert door.active == 0

    door = _Door()
    asyncio.run(scenarios(door))
    assert door.records == [
        ("200", None),
        ("INVALID_ARGUMENT", "bad"),
        ("499", "client disconnected"),
        ("429", "full"),
        ("200", None),
    ]


# ---- the served pipeline with the official client -----------------------------------------------


@pytest.fixture(scope="module")
def client(pipeline):
    import openai

    with openai.OpenAI(base_url=pipeline.http + "/v1", api_key=TEST_API_KEY, max_retries=0, timeout=180) as c:
        yield c


MODEL = "smollm2-135m"
FULL_DEPTH = {"sedac": {"disable_exit": True}}


def _chat(client, prompt: str, **fields):
    extra_body = {**FULL_DEPTH, **fields.pop("extra_body", {})}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], extra_body=extra_body, **fields
    )


def _hf_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of HF's full-model logits at each generated position: ``[len(generated), vocab]``."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].double()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)], dim=-1)


def _hf_penalized_greedy(model, prompt_ids, max_new_tokens, presence, frequency, eos_ids) -> list[int]:
    """Greedy decoding with OpenAI penalties, written out over HF forward logits."""
    generated: list[int] = []
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + generated])).logits[0, -1].clone()
            for token, count in Counter(generated).items():
                logits[token] -= frequency * count + presence
        generated.append(int(logits.argmax()))
        if generated[-1] in eos_ids:
            break
    return generated


@pytest.mark.slow
def test_chat_logprobs_equal_hf_log_softmax(client, smollm2):
    reply = _chat(client, CHAT_PROMPTS[0], max_tokens=8, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    tokens = choice.model_extra["token_ids"]
    reference = _hf_logprobs(smollm2.model, chat_prompt_ids(smollm2.tokenizer, CHAT_PROMPTS[0]), tokens)
    content = choice.logprobs.content
    assert len(content) == len(tokens)
    for row, token, entry in zip(reference, tokens, content, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3)
        assert entry.token == smollm2.tokenizer.decode([token])
        top = row.argsort(descending=True)[:3].tolist()
        assert [smollm2.tokenizer.decode([t]) for t in top] == [t.token for t in entry.top_logprobs]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[top].tolist(), abs=2e-3)
    assert _chat(client, CHAT_PROMPTS[0], max_tokens=2).choices[0].logprobs is None


@pytest.mark.slow
def test_completion_logprobs_and_seed(client, smollm2):
    prompt = "The three primary colors are"
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, logprobs=2, extra_body=FULL_DEPTH
    )
    choice = reply.choices[0]
    tokens = choice.model_extra["token_ids"]
    reference = _hf_logprobs(smollm2.model, smollm2.tokenizer(prompt)["input_ids"], tokens)
    assert choice.logprobs.token_logprobs == pytest.approx(
        [float(r[t]) for r, t in zip(reference, tokens, strict=True)], abs=2e-3
    )
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)

    def sampled(seed):
        return (
            client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, seed=seed, extra_body=FULL_DEPTH
            )
            .choices[0]
            .model_extra["token_ids"]
        )

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


@pytest.mark.slow
def test_n_choices_greedy_identical_and_seeded_reproducible(client):
    greedy = _chat(client, CHAT_PROMPTS[0], max_tokens=8, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 2 * len(greedy.choices[0].model_extra["token_ids"])

    def sampled(seed, n):
        reply = _chat(client, CHAT_PROMPTS[1], max_tokens=10, n=n, temperature=1.0, seed=seed)
        return [c.model_extra["token_ids"] for c in reply.choices]

    first = sampled(11, 2)
    assert first == sampled(11, 2) and first[0] != first[1]
    assert sampled(11, 1) == first[:1]  # choice 0 keeps the seed


@pytest.mark.slow
def test_penalties_equal_a_reference_loop_over_hf_logits(client, smollm2):
    prompt = "Count from 1 to 20, separated by commas."
    prompt_ids = chat_prompt_ids(smollm2.tokenizer, prompt)
    reply = _chat(client, prompt, max_tokens=16, presence_penalty=1.5, frequency_penalty=1.5)
    tokens = reply.choices[0].model_extra["token_ids"]
    eos = {smollm2.tokenizer.eos_token_id, 2}
    assert tokens == _hf_penalized_greedy(smollm2.model, prompt_ids, 16, 1.5, 1.5, eos)
    assert tokens != hf_greedy(smollm2.model, prompt_ids, 16)  # the penalties changed the output


@pytest.mark.slow
def test_max_completion_tokens_stop_and_user(client):
    reply = _chat(client, CHAT_PROMPTS[1], max_completion_tokens=5, user="tester-1")
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    full = _chat(client, CHAT_PROMPTS[0], max_tokens=16).choices[0].message.content
    assert "Paris" in full
    stopped = _chat(client, CHAT_PROMPTS[0], max_tokens=16, stop=["never-there", "Paris"]).choices[0]
    assert stopped.message.content == full[: full.index("Paris")] and stopped.finish_reason == "stop"


@pytest.mark.slow
def test_stream_with_n_and_usage(client):
    whole = _chat(client, CHAT_PROMPTS[0], max_tokens=10, n=2)
    stream = _chat(
        client, CHAT_PROMPTS[0], max_tokens=10, n=2, stream=True, stream_options={"include_usage": True}
    )
    texts, tokens = {0: "", 1: ""}, {0: 0, 1: 0}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        tokens[choice.index] += 1
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    last = chunks[-1]
    assert (
        last.choices == []
        and last.usage.completion_tokens == tokens[0] + tokens[1] == whole.usage.completion_tokens
    )
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields, named",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unsupported_fields_get_400_through_the_client(client, fields, named):
    import openai

    with pytest.raises(openai.BadRequestError, match=named) as caught:
        _chat(client, CHAT_PROMPTS[0], max_tokens=2, **fields)
    assert caught.value.status_code == 400


@pytest.mark.slow
def test_grpc_n_and_logprobs(pipeline, client):
    http = _chat(client, CHAT_PROMPTS[0], max_tokens=6, logprobs=True, top_logprobs=2)
    reply = pipeline.grpc.generate(
        CHAT_PROMPTS[0], chat=True, max_tokens=6, disable_exit=True, n=2, logprobs=True, top_logprobs=2
    )
    assert len(reply.choices) == 2 and list(reply.choices[1].token_ids) == list(reply.token_ids)
    assert list(reply.token_ids) == http.choices[0].model_extra["token_ids"]
    assert [lp.logprob for lp in reply.logprobs] == pytest.approx(
        [c.logprob for c in http.choices[0].logprobs.content], abs=1e-4
    )
    assert all(len(lp.top) == 2 for lp in reply.logprobs)
    chunks = list(pipeline.grpc.stream(CHAT_PROMPTS[0], chat=True, max_tokens=6, disable_exit=True, n=2))
    for index in (0, 1):
        assert [c.token_id for c in chunks if c.choice_index == index] == list(reply.token_ids)
