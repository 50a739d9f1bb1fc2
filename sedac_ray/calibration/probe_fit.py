"""Exit probes on calibration traces: labels, cross-fitted scores, and the probe policy families.

A probe judged on the tokens it was fitted on looks better than it is, so the offline sweep reads
scores cross-fitted by prompt (each prompt scored by probes fitted without it), as the adapters
are (:func:`~.adapter_fit.cross_fitted_readout`). Two families join the V7 sweep:

* ``probe``: the probe alone (``tau=None``), threshold x min_layer;
* ``v7+probe``: the V7 rule AND the probe gate, tau x K x threshold.
"""

from __future__ import annotations

import torch

from sedac_ray.exit.probes import ExitProbes, fit_probes, probe_labels
from sedac_ray.policy import ExitPolicy

from .policies import score, stability_exits
from .sweep import SweepRow, SweepTable, policy_setting
from .traces import Readout, Traces

PROBE, V7_PROBE = "probe", "v7+probe"
PROBE_THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995]
PROBE_MIN_LAYERS = [2, 8, 12, 16, 20, 24]
COMBINED_TAUS = [0.9, 0.93, 0.95, 0.97, 0.98]
COMBINED_KS = [1, 2, 3]


def fit_trace_probes(
    traces: Traces, readout: Readout | None = None, rows: torch.Tensor | None = None
) -> ExitProbes:
    """Probes fitted on ``traces`` (or its ``rows``), labelled by ``readout`` (default: the plain
    head read-out; pass the adapters' read-out to label exits read through exit adapters)."""
    if traces.hidden is None:
        raise ValueError("fitting exit probes needs traces recorded with hidden states (keep_hidden=True)")
    readout = readout or traces.readout
    rows = torch.arange(len(traces)) if rows is None else rows
    return fit_probes(traces.hidden[rows], probe_labels(readout.tokens[rows], traces.reference[rows]))


def cross_fitted_probe_scores(
    traces: Traces, readout: Readout | None = None, folds: int = 2
) -> tuple[torch.Tensor, list[ExitProbes]]:
    """Scores ``[N, L]`` of every token by probes fitted without its prompt, and each fold's probes."""
    scores = torch.zeros(len(traces), traces.num_layers)
    group = traces.prompt_index % folds
    fold_probes = []
    for fold in range(folds):
        held, train = (group == fold).nonzero()[:, 0], (group != fold).nonzero()[:, 0]
        probes = fit_trace_probes(traces, readout, train)
        fold_probes.append(probes)
        scores[held] = probes.scores(traces.hidden[held])
    return scores, fold_probes


def probe_policies() -> dict[str, list[ExitPolicy]]:
    return {
        PROBE: [
            ExitPolicy(tau=None, probe=t, min_layer=m) for t in PROBE_THRESHOLDS for m in PROBE_MIN_LAYERS
        ],
        V7_PROBE: [
            ExitPolicy(tau, k=k, probe=t)
            for tau in COMBINED_TAUS
            for k in COMBINED_KS
            for t in PROBE_THRESHOLDS
        ],
    }


def probe_table(traces: Traces, scores: torch.Tensor, readout: Readout | None = None) -> SweepTable:
    """Offline agreement and layers saved of every probe-family setting on ``traces``."""
    readout = readout or traces.readout
    rows: list[SweepRow] = []
    exits = {}
    for family, policies in probe_policies().items():
        layers = stability_exits(traces.stabilities, policies, scores)
        exits[family] = layers
        agreement, mean_layers = score(readout, traces.reference, layers)
        for policy, a, m in zip(policies, agreement.tolist(), mean_layers.tolist(), strict=True):
            rows.append(SweepRow(family, policy_setting(policy), a, m, 1.0 - m / traces.num_layers))
    return SweepTable(traces.num_layers, len(traces), traces.num_prompts, rows, exits)
