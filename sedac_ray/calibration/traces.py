"""Teacher-forced traces: every layer's hidden state for every token the full model generates.

For each prompt the full model (exits disabled) generates its greedy continuation ``c_0..c_{n-1}``.
Then one forward pass over ``prompt + c_0..c_{n-2}`` records each decoder layer's raw output at the
continuation's positions. Row ``t`` of a trace is the decode token whose input is ``c_t``: the full
model's greedy token on that prefix is ``c_{t+1}``, and every policy is judged on whether its exit
layer's readout gives the same token. (``c_0`` comes from the prefill, which always runs every
layer, so it is no decode token.)

Policies are then evaluated offline on these arrays: the exit layer of each token follows from its
stabilities or its per-layer head readouts. What this ignores: in the real engine, the deeper-layer
K/V of earlier tokens that exited come from state propagation, not from full depth;
:mod:`sedac_ray.calibration.validate` measures the real runtime on the same positions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sedac_ray.exit_adapters import ExitAdapters, exit_logits
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import LoadedModel
from sedac_ray.policy import ExitPolicy, stability
from sedac_ray.sampling import SamplingParams

from .prompts import PromptItem


@dataclass
class Readout:
    """What the head says at every layer: ``tokens[n, l-1]`` is the argmax of the exit logits of
    token ``n`` after layer ``l``; ``confidence`` the top softmax probability; ``entropy`` the
    entropy (nats) of that softmax."""

    tokens: torch.Tensor  # [N, L] long
    confidence: torch.Tensor  # [N, L] float
    entropy: torch.Tensor  # [N, L] float

    def select(self, rows: torch.Tensor) -> Readout:
        return Readout(self.tokens[rows], self.confidence[rows], self.entropy[rows])


@dataclass
class Traces:
    """Decode tokens of many prompts, one row each (see the module docstring)."""

    num_layers: int
    prompt_index: torch.Tensor  # [N] which prompt each row belongs to
    stabilities: torch.Tensor  # [N, L]; column l-1 holds s_l, column 0 is NaN
    reference: torch.Tensor  # [N] the full model's greedy next token (incremental decoding)
    readout: Readout  # plain head readout (final norm + head) at every layer
    hidden: torch.Tensor | None = None  # [N, L, D] float32 raw layer outputs h_1..h_L
    prompt_ids: list[list[int]] | None = None  # per prompt, for runs of the real engine
    continuations: list[list[int]] | None = None  # the full model's greedy continuation per prompt

    def __len__(self) -> int:
        return int(self.reference.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_index.max()) + 1 if len(self) else 0

    def select(self, rows: torch.Tensor) -> Traces:
        return Traces(
            num_layers=self.num_layers,
            prompt_index=self.prompt_index[rows],
            stabilities=self.stabilities[rows],
            reference=self.reference[rows],
            readout=self.readout.select(rows),
            hidden=None if self.hidden is None else self.hidden[rows],
            prompt_ids=self.prompt_ids,
            continuations=self.continuations,
        )


def greedy_continuations(
    loaded: LoadedModel, prompts: list[PromptItem], max_new_tokens: int, batch_size: int = 8
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and the full model's greedy continuation of each (stopping at EOS)."""
    from sedac_ray.engine import Engine

    engine = Engine(loaded, ExitPolicy.disabled())
    prompt_ids = encode_prompts(engine, prompts)
    continuations: list[list[int]] = []
    batches = range(0, len(prompt_ids), batch_size)
    for start in tqdm(batches, desc="full-model continuations", unit="batch", leave=False):
        batch = prompt_ids[start : start + batch_size]
        results = engine.generate_ids(batch, max_new_tokens, SamplingParams(), [], ExitPolicy.disabled())
        continuations += [r.token_ids for r in results]
    return prompt_ids, continuations


def encode_prompts(engine, prompts: list[PromptItem]) -> list[list[int]]:
    """Token ids of each prompt as ``engine`` (an :class:`~sedac_ray.engine.Engine`) encodes it."""
    return [engine.encode(as_engine_prompt(item.prompt), item.chat) for item in prompts]


def as_engine_prompt(prompt: str | tuple[dict, ...]) -> str | list[dict]:
    return prompt if isinstance(prompt, str) else list(prompt)


def record_traces(
    loaded: LoadedModel,
    prompts: list[PromptItem],
    max_new_tokens: int = 40,
    keep_hidden: bool = True,
    batch_size: int = 8,
    cache: bool = False,
) -> Traces:
    """Teacher-forced traces of ``prompts`` (see the module docstring). ``cache=True`` keeps them
    under ``$SEDAC_CACHE_DIR/traces``, keyed by model, weights fingerprint, dtype, device, prompts
    and length, so ``sedac calibrate`` and ``sedac bench quality`` record each set once."""
    if not cache:
        return _record(loaded, prompts, max_new_tokens, keep_hidden, batch_size)
    path = _cache_path(loaded, prompts, max_new_tokens)
    if path.is_file():
        traces = torch.load(path, weights_only=False)
        if traces.hidden is not None or not keep_hidden:
            return traces
    traces = _record(loaded, prompts, max_new_tokens, True, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(traces, path)
    return traces


def _cache_path(loaded: LoadedModel, prompts: list[PromptItem], max_new_tokens: int) -> Path:
    from sedac_ray.model.loading import cache_dir

    weights = loaded.model.get_input_embeddings().weight
    key = json.dumps(
        {
            "format": 1,
            "model": loaded.name,
            "fingerprint": float(weights[:64].double().sum()),
            "dtype": str(weights.dtype),
            "device": str(weights.device),
            "prompts": [[p.prompt, p.chat] for p in prompts],
            "max_new_tokens": max_new_tokens,
        }
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "traces" / f"{loaded.name.replace('/', '--')}-{digest}.pt"


@torch.inference_mode()
def _record(
    loaded: LoadedModel, prompts: list[PromptItem], max_new_tokens: int, keep_hidden: bool, batch_size: int
) -> Traces:
    adapter = ModelAdapter(loaded.model, verify=False)
    prompt_ids, continuations = greedy_continuations(loaded, prompts, max_new_tokens, batch_size)
    hidden_parts, index_parts, reference_parts = [], [], []
    captured: list[torch.Tensor] = []

    def keep_output(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_hook(keep_output) for layer in adapter.layers]
    try:
        pairs = list(zip(prompt_ids, continuations, strict=True))
        for number, (ids, continuation) in enumerate(
            tqdm(pairs, desc="layer traces", unit="prompt", leave=False)
        ):
            if len(continuation) < 2:
                continue  # only the prefill's token: no decode token to judge
            captured.clear()
            inputs = torch.tensor([ids + continuation[:-1]], device=adapter.device)
            loaded.model(input_ids=inputs, use_cache=False)
            rows = slice(len(ids), len(ids) + len(continuation) - 1)
            hidden_parts.append(torch.stack([h[0, rows].float().cpu() for h in captured], dim=1))
            index_parts.append(torch.full((len(continuation) - 1,), number, dtype=torch.long))
            reference_parts.append(torch.tensor(continuation[1:]))
    finally:
        for handle in handles:
            handle.remove()
    hidden = torch.cat(hidden_parts)
    stabilities = torch.full(hidden.shape[:2], float("nan"))
    stabilities[:, 1:] = stability(hidden[:, 1:], hidden[:, :-1])
    return Traces(
        num_layers=adapter.num_layers,
        prompt_index=torch.cat(index_parts),
        stabilities=stabilities,
        reference=torch.cat(reference_parts),
        readout=head_readout(adapter, hidden),
        hidden=hidden if keep_hidden else None,
        prompt_ids=prompt_ids,
        continuations=continuations,
    )


@torch.inference_mode()
def head_readout(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    exit_adapters: ExitAdapters | None = None,
    chunk: int = 512,
    desc: str = "head readout",
) -> Readout:
    """Read the head at every layer of ``hidden[N, L, D]`` through :func:`exit_logits` (the engine's
    own exit step, with ``exit_adapters`` if given)."""
    rows, num_layers, _ = hidden.shape
    tokens = torch.empty(rows, num_layers, dtype=torch.long)
    confidence = torch.empty(rows, num_layers)
    entropy = torch.empty(rows, num_layers)
    for layer in tqdm(range(1, num_layers + 1), desc=desc, unit="layer", leave=False):
        for start in range(0, rows, chunk):
            part = hidden[start : start + chunk, layer - 1].to(adapter.device, adapter.dtype)
            layers = torch.full((len(part),), layer, dtype=torch.long)
            logp = torch.log_softmax(exit_logits(adapter, part, layers, exit_adapters).float(), dim=-1)
            top, arg = logp.max(dim=-1)
            tokens[start : start + chunk, layer - 1] = arg.cpu()
            confidence[start : start + chunk, layer - 1] = top.exp().cpu()
            entropy[start : start + chunk, layer - 1] = -(logp.exp() * logp).sum(-1).cpu()
    return Readout(tokens, confidence, entropy)
