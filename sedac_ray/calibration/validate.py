"""Check a policy with the real runtime: teacher-forced on the positions the traces judge, or
free-running (the policy writes its own text, every token judged against the full model on the
same prefix).

Each prompt is prefilled, then fed the full model's own continuation one token per decode step
through :class:`LayerRange` (the engine's runtime: token-group separation, state propagation of
exited tokens' K/V). At every step the exit path's token (its exit layer's logits through
:func:`exit_logits`, greedy) is compared with the full model's next token. Unlike the offline
traces, the deeper-layer K/V of earlier tokens that exited come from state propagation here,
feeding the reference tokens keeps both on the same prefixes.

:func:`free_running` is the number a default policy must hold: the engine generates with the
policy, then one Hugging Face forward pass over ``prompt + generated`` (an independent reference,
full depth, exact K/V) gives the full model's greedy token after every prefix the policy wrote.
Errors compound here (a wrong token changes every later prefix), as they do for users. With
``deferred_fill=True`` the engine gives exited tokens exact K/V (:class:`~sedac_ray.engine.Engine`);
``layers_saved`` then counts the deferred layers as computed, not saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sedac_ray.exit.probes import ExitProbes
from sedac_ray.exit_adapters import ExitAdapters, exit_logits
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import ExitPolicy
from sedac_ray.runtime.layer_range import LayerRange, TokenRows


@dataclass
class TeacherForcedResult:
    tokens: int  # decode tokens judged
    agreement: float  # share equal to the full model's greedy token
    mean_layers: float
    layers_saved: float
    exit_layers: list[int]
    matches: list[bool]
    # Deferred fill only: layers run later for exited tokens. They are computed, so layers_saved
    # counts them as run; exit_depth_saved is the share of layers before each token's read-out.
    deferred_layers: int | None = None
    exit_depth_saved: float | None = None

    @classmethod
    def from_tokens(
        cls, matches: list[bool], exit_layers: list[int], num_layers: int, deferred_layers: int | None = None
    ) -> TeacherForcedResult:
        tokens = len(matches)
        mean_layers = sum(exit_layers) / tokens if tokens else float(num_layers)
        computed = mean_layers + (deferred_layers or 0) / tokens if tokens else mean_layers
        return cls(
            tokens=tokens,
            agreement=sum(matches) / tokens if tokens else 1.0,
            mean_layers=mean_layers,
            layers_saved=1.0 - computed / num_layers,
            exit_layers=exit_layers,
            matches=matches,
            deferred_layers=deferred_layers,
            exit_depth_saved=None if deferred_layers is None else 1.0 - mean_layers / num_layers,
        )

    def to_dict(self) -> dict:
        figures = {
            "tokens": self.tokens,
            "agreement": self.agreement,
            "mean_layers": self.mean_layers,
            "layers_saved": self.layers_saved,
        }
        if self.deferred_layers is not None:
            figures.update(deferred_layers=self.deferred_layers, exit_depth_saved=self.exit_depth_saved)
        return figures


@torch.inference_mode()
def teacher_forced(
    adapter: ModelAdapter,
    prompt_ids: list[list[int]],
    continuations: list[list[int]],
    policy: ExitPolicy,
    exit_adapters: ExitAdapters | None = None,
    batch_size: int = 16,
    progress: bool = True,
    probes: ExitProbes | None = None,
) -> TeacherForcedResult:
    """``probes`` serve a probe policy's gate."""
    num_layers = adapter.num_layers
    device = adapter.device
    matches: list[bool] = []
    exit_layers: list[int] = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in tqdm(
        starts,
        desc=f"engine, teacher-forced ({policy.describe()})",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        prompts = prompt_ids[start : start + batch_size]
        targets = continuations[start : start + batch_size]
        layers = LayerRange(adapter, 0, num_layers, probes=probes)
        slots = torch.tensor(layers.cache.allocate(len(prompts)))
        lengths = torch.tensor([len(ids) for ids in prompts])
        width = int(lengths.max())
        padded = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in prompts], device=device)
        layers.prefill(slots, torch.arange(width).expand(len(prompts), width), adapter.embed_tokens(padded))
        rules = policy.rules(len(prompts))
        for step in range(max(len(c) for c in targets) - 1):
            index = torch.tensor([i for i, c in enumerate(targets) if step + 1 < len(c)])
            inputs = torch.tensor([targets[i][step] for i in index.tolist()], device=device)
            rows = TokenRows(
                ids=index,
                slots=slots[index],
                positions=lengths[index] + step,
                hidden=adapter.embed_tokens(inputs),
                rules=rules[index],
            )
            exited = layers.decode(rows).exited
            chosen = (
                exit_logits(adapter, exited.hidden, exited.exit_layer, exit_adapters).argmax(dim=-1).tolist()
            )
            for row, token, layer in zip(
                exited.ids.tolist(), chosen, exited.exit_layer.tolist(), strict=True
            ):
                matches.append(token == targets[row][step + 1])
                exit_layers.append(layer)
    return TeacherForcedResult.from_tokens(matches, exit_layers, num_layers)


@torch.inference_mode()
def free_running(
    loaded,
    prompt_ids: list[list[int]],
    policy: ExitPolicy,
    max_new_tokens: int,
    exit_adapters: ExitAdapters | None = None,
    probes=None,
    batch_size: int = 16,
    progress: bool = True,
    deferred_fill: bool = False,
) -> TeacherForcedResult:
    """Greedy generation with ``policy`` by the engine; each decode token (not the prefill's) is
    compared with the full model's greedy token on the prefix the policy itself produced."""
    from sedac_ray.engine import Engine
    from sedac_ray.sampling import SamplingParams

    engine = Engine(loaded, policy, adapters=exit_adapters, probes=probes, deferred_fill=deferred_fill)
    model = loaded.model
    matches: list[bool] = []
    exit_layers: list[int] = []
    deferred_layers = 0
    starts = range(0, len(prompt_ids), batch_size)
    for start in tqdm(
        starts,
        desc=f"engine, free-running ({policy.describe()})",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        batch = prompt_ids[start : start + batch_size]
        results = engine.generate_ids(batch, max_new_tokens, SamplingParams(), [], policy)
        for ids, result in zip(batch, results, strict=True):
            generated = result.token_ids
            if len(generated) < 2:
                continue
            inputs = torch.tensor([ids + generated[:-1]], device=engine.adapter.device)
            logits = model(input_ids=inputs, use_cache=False).logits[0, len(ids) :]
            reference = logits.argmax(
                dim=-1
            ).tolist()  # reference[t]: full model's token after generated[:t+1]
            matches += [a == b for a, b in zip(generated[1:], reference, strict=True)]
            exit_layers += result.exit_layers[1:]
            deferred_layers += result.deferred_layers or 0
    return TeacherForcedResult.from_tokens(
        matches, exit_layers, engine.num_layers, deferred_layers if deferred_fill else None
    )


def teacher_forced_cross_fitted(
    adapter: ModelAdapter,
    prompt_ids: list[list[int]],
    continuations: list[list[int]],
    policy: ExitPolicy,
    fold_adapters: list[ExitAdapters],
    batch_size: int = 16,
    progress: bool = True,
) -> TeacherForcedResult:
    """:func:`teacher_forced` where prompt ``i`` is read through ``fold_adapters[i % folds]``,
    adapters fitted without it (see :func:`~.adapter_fit.cross_fitted_readout`)."""
    folds = len(fold_adapters)
    matches: list[bool] = []
    exit_layers: list[int] = []
    for fold, adapters in enumerate(fold_adapters):
        part = teacher_forced(
            adapter,
            prompt_ids[fold::folds],
            continuations[fold::folds],
            policy,
            adapters,
            batch_size,
            progress,
        )
        matches += part.matches
        exit_layers += part.exit_layers
    return TeacherForcedResult.from_tokens(matches, exit_layers, adapter.num_layers)
