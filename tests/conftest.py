"""Shared fixtures: the real default model (loaded once) and tiny config-built models."""

from __future__ import annotations

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

from sedac_ray.model.loading import LoadedModel, load_model

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
