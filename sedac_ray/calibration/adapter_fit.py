"""Fit exit adapters (:mod:`sedac_ray.exit_adapters`) on calibration traces by least squares.

For each layer ``l < L``: ``x = rms_normalise(h_l)``, ``y = rms_normalise(h_L)``; ridge regression of
the residual ``y - x`` on ``[x, 1]`` gives ``A_l, b_l``; reduced-rank regression keeps the ``rank``
directions of ``x A_l`` that carry most of the fitted change (``A ≈ (A V) Vᵀ``), so each layer costs
``2 · D · rank + D`` numbers. Normalising first makes every token weigh the same and matches what
the final norm sees. All outputs share one design matrix, so the least-squares solution is the
same for any linear metric on the output space, including the head's own (``lm_head ∘ diag(w)``).
"""

from __future__ import annotations

import torch

from sedac_ray.exit_adapters import ExitAdapters

DEFAULT_RANK = 64
DEFAULT_RIDGE = 0.04  # ridge strength per training token (lambda = ridge * tokens)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def fit_exit_adapters(
    hidden: torch.Tensor,
    layers: list[int] | None = None,
    rank: int | None = DEFAULT_RANK,
    ridge: float = DEFAULT_RIDGE,
) -> ExitAdapters:
    """``hidden[N, L, D]``: raw outputs ``h_1..h_L`` of ``N`` training tokens. ``layers`` defaults to
    ``1..L-1``; ``rank=None`` keeps the full ``D x D`` map."""
    tokens, num_layers, width = hidden.shape
    if tokens < 2:
        raise ValueError("fitting exit adapters needs at least 2 tokens")
    layers = list(range(1, num_layers)) if layers is None else layers
    target = _normalise(hidden[:, num_layers - 1].double())
    penalty = ridge * tokens * torch.eye(width + 1, dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    maps = {}
    for layer in layers:
        x = _normalise(hidden[:, layer - 1].double())
        design = torch.cat([x, torch.ones(tokens, 1, dtype=x.dtype)], dim=1)
        solution = torch.linalg.solve(design.T @ design + penalty, design.T @ (target - x))
        weight, bias = solution[:-1], solution[-1]
        if rank is not None and rank < width:
            _, _, right = torch.linalg.svd(x @ weight, full_matrices=False)
            basis = right[:rank].T  # [D, rank]
            down, up = weight @ basis, basis.T
        else:
            down, up = weight, torch.eye(width, dtype=weight.dtype)
        maps[layer] = (down.float(), up.float(), bias.float())
    return ExitAdapters(maps, num_layers)


def cross_fitted_readout(
    model_adapter,
    traces,
    folds: int = 2,
    rank: int | None = DEFAULT_RANK,
    ridge: float = DEFAULT_RIDGE,
):
    """The head readout of every token through adapters fitted without that token's prompt: prompts
    are split into ``folds`` groups (by prompt index modulo ``folds``) and each group is read through
    adapters fitted on the others. Returns the readout and the adapters of each fold. Sweeping on
    this readout picks an honest setting; adapters judged on their own training tokens look better
    than they are."""
    from .traces import Readout, head_readout

    if traces.hidden is None:
        raise ValueError("traces were recorded without hidden states (keep_hidden=False)")
    tokens, num_layers = traces.readout.tokens.shape
    readout = Readout(
        torch.empty(tokens, num_layers, dtype=torch.long),
        torch.empty(tokens, num_layers),
        torch.empty(tokens, num_layers),
    )
    group = traces.prompt_index % folds
    fold_adapters = []
    for fold in range(folds):
        held, train = (group == fold).nonzero()[:, 0], (group != fold).nonzero()[:, 0]
        adapters = fit_exit_adapters(traces.hidden[train], rank=rank, ridge=ridge)
        fold_adapters.append(adapters)
        part = head_readout(
            model_adapter, traces.hidden[held], adapters, desc=f"cross-fit readout {fold + 1}/{folds}"
        )
        readout.tokens[held], readout.confidence[held], readout.entropy[held] = (
            part.tokens,
            part.confidence,
            part.entropy,
        )
    return readout, fold_adapters
