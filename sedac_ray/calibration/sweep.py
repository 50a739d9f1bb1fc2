"""Sweep policy families over traces: one table of (setting, agreement, layers saved) rows.

Settings are built once from the calibration traces (:func:`build_settings`; V6's entropy
thresholds are quantiles of the calibration entropies) and then evaluated unchanged on any traces,
so rows of a calibration sweep and a held-out sweep line up one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sedac_ray.policy import ExitPolicy

from .policies import (
    checkpoint_exits,
    confidence_exits,
    oracle_frontier,
    score,
    stability_exits,
    stable_oracle_exits,
    v6_checkpoints,
)
from .traces import Readout, Traces

V7, WINDOW, V6, CALM, ORACLE, STABLE_ORACLE, NO_EXIT = (
    "v7",
    "window",
    "v6",
    "calm",
    "oracle",
    "oracle-stable",
    "no-exit",
)
FAMILY_TITLES = {
    V7: "V7 stability (tau, K, min_layer)",
    WINDOW: "V7 window (K of last N)",
    V6: "V6 entropy checkpoints (L/4, L/2, 3L/4)",
    CALM: "CALM softmax confidence",
    ORACLE: "oracle (hindsight bound)",
    STABLE_ORACLE: "oracle, stable from exit on",
    NO_EXIT: "no exit",
}


def _taus() -> list[float]:
    coarse = [0.8, 0.85, 0.88] + [round(0.9 + 0.005 * i, 3) for i in range(14)]
    return coarse + [round(0.97 + 0.001 * i, 3) for i in range(30)]


@dataclass
class SweepGrid:
    """What to sweep. The defaults are what ``sedac calibrate`` and ``sedac bench quality`` use."""

    taus: list[float] = field(default_factory=_taus)
    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    min_layers: list[int] = field(default_factory=lambda: [1, 6, 10, 14, 18, 22, 24, 26, 28])
    windows: list[tuple[int, int]] = field(default_factory=lambda: [(2, 3), (3, 4), (3, 5), (4, 5), (4, 6)])
    window_min_layers: list[int] = field(default_factory=lambda: [1, 16, 24])
    v6_quantiles: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    )
    calm_thresholds: list[float] = field(
        default_factory=lambda: [
            0.5,
            0.6,
            0.7,
            0.8,
            0.85,
            0.9,
            0.93,
            0.95,
            0.97,
            0.98,
            0.99,
            0.995,
            0.998,
            0.999,
            0.9995,
            0.9999,
        ]
    )
    calm_min_layers: list[int] = field(default_factory=lambda: [1, 8, 16, 20, 22, 24, 26, 28])


@dataclass
class Settings:
    """Concrete settings per family, fixed before any evaluation."""

    v7: list[ExitPolicy]
    window: list[ExitPolicy]
    v6_checkpoints: list[int]
    v6_thresholds: torch.Tensor  # [settings, 3] entropy thresholds (nats); -inf disables a checkpoint
    calm: list[tuple[float, int]]  # (confidence threshold, min_layer)


def build_settings(
    calibration: Traces, grid: SweepGrid | None = None, families: set[str] | None = None
) -> Settings:
    grid = grid or SweepGrid()
    num_layers = calibration.num_layers
    wanted = families or {V7, WINDOW, V6, CALM}
    min_layers = sorted({m for m in grid.min_layers if m <= num_layers})
    v7 = (
        [ExitPolicy(t, k=k, min_layer=m) for t in grid.taus for k in grid.ks for m in min_layers]
        if V7 in wanted
        else []
    )
    window = []
    if WINDOW in wanted:
        window_mins = sorted({m for m in grid.window_min_layers if m <= num_layers})
        window = [
            ExitPolicy(t, k=k, window=n, min_layer=m)
            for t in grid.taus
            for k, n in grid.windows
            for m in window_mins
        ]
    checkpoints = v6_checkpoints(num_layers)
    thresholds = torch.zeros(0, len(checkpoints))
    if V6 in wanted:
        quantiles = torch.tensor(grid.v6_quantiles)
        per_checkpoint = []
        for layer in checkpoints:
            values = torch.quantile(calibration.readout.entropy[:, layer - 1], quantiles)
            values[quantiles <= 0] = -float("inf")  # quantile 0 means "never exit here"
            per_checkpoint.append(values)
        thresholds = torch.cartesian_prod(*per_checkpoint)
    calm = (
        [(t, m) for m in grid.calm_min_layers if m <= num_layers for t in grid.calm_thresholds]
        if CALM in wanted
        else []
    )
    return Settings(v7=v7, window=window, v6_checkpoints=checkpoints, v6_thresholds=thresholds, calm=calm)


@dataclass
class SweepRow:
    family: str
    setting: dict
    agreement: float  # share of decode tokens equal to the full model's greedy token
    mean_layers: float  # decoder layers executed per decode token
    layers_saved: float  # 1 - mean_layers / L

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepTable:
    num_layers: int
    tokens: int
    prompts: int
    rows: list[SweepRow]
    exit_layers: dict[str, torch.Tensor] = field(
        default_factory=dict, repr=False
    )  # family -> [settings, tokens]

    def family(self, name: str) -> list[SweepRow]:
        return [r for r in self.rows if r.family == name]

    def best_at(self, family: str, target: float) -> SweepRow | None:
        """The row of ``family`` with the most layers saved among those with agreement >= target
        (ties: the higher agreement, then the earlier row). ``None`` if no row reaches it."""
        best = None
        for row in self.family(family):
            if row.agreement + 1e-12 < target:
                continue
            if best is None or (row.layers_saved, row.agreement) > (best.layers_saved, best.agreement):
                best = row
        return best

    def pareto(self, family: str) -> list[SweepRow]:
        """Rows not beaten on both agreement and layers saved, by increasing agreement."""
        ordered = sorted(self.family(family), key=lambda r: (-r.agreement, -r.layers_saved))
        front, best_saved = [], -float("inf")
        for row in ordered:
            if row.layers_saved > best_saved:
                front.append(row)
                best_saved = row.layers_saved
        return front[::-1]

    def index_of(self, row: SweepRow) -> int:
        return self.family(row.family).index(row)


def sweep(
    traces: Traces, settings: Settings, readout: Readout | None = None, progress: bool = True
) -> SweepTable:
    """Evaluate every setting on ``traces``; ``readout`` replaces the plain head readout (e.g. with
    exit adapters). The oracle rows come from the same readout."""
    readout = readout or traces.readout
    num_layers, reference = traces.num_layers, traces.reference
    rows: list[SweepRow] = []
    exits: dict[str, torch.Tensor] = {}

    def add(family: str, settings_list: list[dict], layers: torch.Tensor) -> None:
        agreement, mean_layers = score(readout, reference, layers)
        exits[family] = layers
        for setting, a, m in zip(settings_list, agreement.tolist(), mean_layers.tolist(), strict=True):
            rows.append(SweepRow(family, setting, a, m, 1.0 - m / num_layers))

    steps = tqdm(total=5, desc="policy sweep", unit="family", leave=False, disable=not progress)
    for family, policies in ((V7, settings.v7), (WINDOW, settings.window)):
        if policies:
            add(
                family,
                [policy_setting(p) for p in policies],
                _chunked_stability_exits(traces, policies, progress),
            )
        steps.update()
    if len(settings.v6_thresholds):
        thresholds = settings.v6_thresholds
        described = [
            {"checkpoints": settings.v6_checkpoints, "entropy_below": [_finite(v) for v in t.tolist()]}
            for t in thresholds
        ]
        add(V6, described, checkpoint_exits(readout.entropy, settings.v6_checkpoints, thresholds))
    steps.update()
    if settings.calm:
        parts = []
        for min_layer in sorted({m for _, m in settings.calm}):
            values = torch.tensor([t for t, m in settings.calm if m == min_layer])
            parts.append((min_layer, values, confidence_exits(readout.confidence, values, min_layer)))
        order = [
            {"confidence_at_least": t, "min_layer": m} for m, values, _ in parts for t in values.tolist()
        ]
        add(CALM, order, torch.cat([layers for *_, layers in parts]))
    steps.update()
    add(STABLE_ORACLE, [{}], stable_oracle_exits(readout, reference))
    add(NO_EXIT, [{}], torch.full((1, len(traces)), num_layers))
    frontier = oracle_frontier(readout, reference)
    for agreement, mean_layers in zip(
        frontier.agreement.tolist(), frontier.mean_layers.tolist(), strict=True
    ):
        rows.append(SweepRow(ORACLE, {}, agreement, mean_layers, 1.0 - mean_layers / num_layers))
    steps.update(2)
    steps.close()
    return SweepTable(
        num_layers=num_layers, tokens=len(traces), prompts=traces.num_prompts, rows=rows, exit_layers=exits
    )


def _chunked_stability_exits(traces: Traces, policies: list[ExitPolicy], progress: bool) -> torch.Tensor:
    chunk = 64
    parts = []
    for start in tqdm(
        range(0, len(policies), chunk), desc="stability rule", unit="chunk", leave=False, disable=not progress
    ):
        parts.append(stability_exits(traces.stabilities, policies[start : start + chunk]))
    return torch.cat(parts)


def policy_setting(policy: ExitPolicy) -> dict:
    setting = {"tau": policy.tau, "k": policy.k, "min_layer": policy.min_layer or 1}
    if policy.window:
        setting["window"] = policy.window
    if policy.probe is not None:
        setting["probe"] = policy.probe
    return setting


def policy_from_setting(setting: dict) -> ExitPolicy:
    tau, probe = setting.get("tau"), setting.get("probe")
    return ExitPolicy(
        tau=None if tau is None else float(tau),
        k=int(setting.get("k", 3)),
        min_layer=None if int(setting.get("min_layer") or 1) <= 1 else int(setting["min_layer"]),
        window=setting.get("window"),
        probe=None if probe is None else float(probe),
    )


def _finite(value: float) -> float | None:
    return None if value == -float("inf") else round(value, 6)
