"""``sedac calibrate``: choose a model's default exit policy from its own quality/savings trade-off.

1. Record teacher-forced traces of the calibration prompts (:mod:`.traces`).
2. Sweep the V7 rule over tau x K x min_layer offline; with ``fit_probes``, also fit exit probes
   (:mod:`sedac_ray.exit.probes`) and sweep the probe and V7+probe families on cross-fitted probe
   scores (:mod:`.probe_fit`).
3. Offline numbers ignore state propagation and compounding errors, so the settings on each
   family's offline Pareto front that reach the target are checked with the real engine,
   free-running on the calibration prompts (:func:`.validate.free_running`), by bisection along the
   front (agreement falls as savings grow).
4. Pick the checked setting that saves the most layers with free-running agreement >= the target.
5. Optionally fit exit adapters and pick a second setting for use with them, judged on
   cross-fitted adapters (each prompt read through adapters fitted without it).
6. Check each pick free-running on the held-out prompts. A pick that misses its target there is
   not shipped: the file then says "no exit" and why. So does a run where no setting reaches the
   target. Write ``<model>.<dtype>.json`` (and the adapter and probe files beside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sedac_ray.exit.probes import ExitProbes
from sedac_ray.exit_adapters import ExitAdapters
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import LoadedModel
from sedac_ray.policy import ExitPolicy

from .adapter_fit import DEFAULT_RANK, DEFAULT_RIDGE, cross_fitted_readout, fit_exit_adapters
from .probe_fit import PROBE, V7_PROBE, cross_fitted_probe_scores, fit_trace_probes, probe_table
from .prompts import load_prompts
from .store import Calibration, calibration_file_name, dtype_name, policy_to_dict, user_calibration_dir
from .sweep import V7, SweepGrid, SweepRow, SweepTable, build_settings, policy_from_setting, sweep
from .traces import Traces, encode_prompts, record_traces
from .validate import TeacherForcedResult, free_running


@dataclass
class Checked:
    """One offline sweep row, checked with the real runtime on the calibration prompts."""

    row: SweepRow
    runtime: TeacherForcedResult

    def to_dict(self) -> dict:
        return {
            "family": self.row.family,
            "setting": self.row.setting,
            "offline_agreement": self.row.agreement,
            "runtime_agreement": self.runtime.agreement,
            "runtime_layers_saved": self.runtime.layers_saved,
        }


@dataclass
class Choice:
    table: SweepTable  # the offline sweep
    checked: list[Checked]  # the rows checked with the runtime, in the order they were checked
    best: Checked  # the checked row saving the most layers at runtime agreement >= target

    @property
    def policy(self) -> ExitPolicy:
        return policy_from_setting(self.best.row.setting)


@dataclass
class CalibrationRun:
    calibration: Calibration
    choice: Choice | None  # None when no setting reached the target
    traces: Traces
    adapters: ExitAdapters | None = None
    adapter_choice: Choice | None = None
    probes: ExitProbes | None = None
    timings: dict = field(default_factory=dict)


class TargetUnreachable(ValueError):
    def __init__(self, message: str, checked: list[Checked] | None = None):
        super().__init__(message)
        self.checked = checked or []  # runtime checks made before giving up, for the record


def choose(
    table: SweepTable,
    target: float,
    check,
    family: str = V7,
    max_checks: int | None = None,
    margin: float = 0.0,
) -> Choice:
    """Search ``family``'s offline Pareto front (rows with offline agreement >= ``target +
    margin``, most layers saved first) with ``check(row) -> TeacherForcedResult``; return the
    checked row that saves the most layers with runtime agreement >= ``target``. The most
    aggressive row is checked first (if it passes, no row can beat it), then the most
    conservative, then a bisection between them. ``max_checks`` bounds the runtime checks (each is
    a generation run): the search then stops at the best passing row so far."""
    front = [r for r in table.pareto(family) if r.agreement + 1e-12 >= target + margin]
    front.sort(key=lambda r: (-r.layers_saved, r.agreement))
    if not front:
        best = max(r.agreement for r in table.family(family))
        raise TargetUnreachable(
            f"no swept {family} setting reaches agreement {target + margin:g} offline (best {best:.4f})"
        )
    checked: dict[int, Checked] = {}

    def passes(i: int) -> bool:
        if i not in checked:
            checked[i] = Checked(front[i], check(front[i]))
        return checked[i].runtime.agreement + 1e-12 >= target

    def budget_left() -> bool:
        return max_checks is None or len(checked) < max_checks

    low, high = 0, len(front) - 1
    if not passes(low):
        if not budget_left() or not passes(high):
            last = checked[max(checked)]
            raise TargetUnreachable(
                f"the {family} settings checked ({[c.row.setting for c in checked.values()]}) reach only "
                f"{last.runtime.agreement:.4f} agreement in the runtime",
                list(checked.values()),
            )
        low += 1
        while low < high and budget_left():
            # the first front index that passes, assuming agreement falls with savings
            middle = (low + high) // 2
            if passes(middle):
                high = middle
            else:
                low = middle + 1
    passing = [c for c in checked.values() if c.runtime.agreement + 1e-12 >= target]
    best = max(passing, key=lambda c: (c.runtime.layers_saved, c.runtime.agreement))
    return Choice(table=table, checked=list(checked.values()), best=best)


# A pick that saves fewer layers than this ships "no exit": measured on SmolLM2, exits saving under
# 3% of layers ran 0.87-0.95x the speed of no exit (benchmarks/results/quality_probes.json).
MIN_LAYERS_SAVED = 0.05


def too_little_saved(policy: ExitPolicy, saved: float, minimum: float) -> str:
    return (
        f"the best setting that holds the target ({policy.describe()}) saves {saved:.1%} of layers, "
        f"under the {minimum:.0%} that exits need to pay for their own cost"
    )


def calibrate(
    loaded: LoadedModel,
    target: float = 0.95,
    prompts: str = "calibration",
    max_new_tokens: int = 40,
    grid: SweepGrid | None = None,
    fit_adapters: bool = False,
    adapter_rank: int | None = DEFAULT_RANK,
    validate_on: str | None = "heldout",
    traces: Traces | None = None,
    progress: bool = True,
    cache: bool = True,
    fit_probes: bool = False,
    max_checks: int | None = 4,
    margin: float = 0.0,
    min_layers_saved: float = MIN_LAYERS_SAVED,
) -> CalibrationRun:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    clock = time.perf_counter()
    timings = {}
    items = load_prompts(prompts)
    if traces is None:
        keep = fit_adapters or fit_probes
        traces = record_traces(loaded, items, max_new_tokens, keep_hidden=keep, cache=cache)
    timings["traces_s"] = round(time.perf_counter() - clock, 1)
    model_adapter = ModelAdapter(loaded.model, verify=False)
    settings = build_settings(traces, grid, families={V7})
    tables = {V7: sweep(traces, settings, progress=progress)}
    probes = None
    if fit_probes:
        scores, _ = cross_fitted_probe_scores(traces)
        tables[PROBE] = tables[V7_PROBE] = probe_table(traces, scores)
        probes = fit_trace_probes(traces)
    timings["sweep_s"] = round(time.perf_counter() - clock - timings["traces_s"], 1)

    def runtime(row: SweepRow, fold_adapters=None) -> TeacherForcedResult:
        """The row's policy in the real engine, free-running on the calibration prompts."""
        return free_running_folds(
            loaded,
            traces.prompt_ids,
            policy_from_setting(row.setting),
            max_new_tokens,
            fold_adapters,
            probes,
            progress,
        )

    choices, failures, failed_checks = [], [], []
    offline_best = {family: table.best_at(family, target) for family, table in tables.items()}
    for family, table in tables.items():
        best, v7_best = offline_best[family], offline_best[V7]
        if (
            family != V7
            and best is not None
            and v7_best is not None
            and best.layers_saved <= v7_best.layers_saved
        ):
            continue  # a family that does not beat V7 offline is not worth its runtime checks
        try:
            choices.append(choose(table, target, runtime, family, max_checks, margin))
        except TargetUnreachable as err:
            failures.append(str(err))
            failed_checks += err.checked
    choice = max(choices, key=lambda c: (c.best.runtime.layers_saved, c.best.runtime.agreement), default=None)
    adapters = adapter_choice = adapter_entry = None
    if fit_adapters:
        readout, fold_adapters = cross_fitted_readout(model_adapter, traces, rank=adapter_rank)
        adapter_table = sweep(traces, settings, readout=readout, progress=progress)
        try:
            adapter_choice = choose(
                adapter_table,
                target,
                lambda row: runtime(row, fold_adapters),
                max_checks=max_checks,
                margin=margin,
            )
        except TargetUnreachable as err:
            failures.append(f"with exit adapters: {err}")
        adapters = fit_exit_adapters(traces.hidden, rank=adapter_rank)
        adapter_entry = {
            "file": None,  # set by write()
            "policy": policy_to_dict(adapter_choice.policy if adapter_choice else ExitPolicy.disabled()),
            "agreement": adapter_choice.best.runtime.agreement if adapter_choice else None,
            "layers_saved": adapter_choice.best.runtime.layers_saved if adapter_choice else 0.0,
            "offline_agreement": adapter_choice.best.row.agreement if adapter_choice else None,
            "rank": adapter_rank,
            "ridge": DEFAULT_RIDGE,
            "judged_with": "2-fold cross-fitted adapters on the calibration prompts, free-running",
            "checked": [c.to_dict() for c in adapter_choice.checked] if adapter_choice else [],
        }

    details = {
        "calibrated_on": {
            "prompts": prompts,
            "num_prompts": len(items),
            "decode_tokens": len(traces),
            "max_new_tokens": max_new_tokens,
            "device": str(model_adapter.device),
        },
        "method": "agreement = each decode token the policy generates (free-running, greedy) equals the "
        "full model's greedy token on the same prefix (one Hugging Face forward over prompt + output); the "
        "prefill token always runs every layer. Offline sweeps on teacher-forced traces; the Pareto-front "
        "settings of each family that reach the target offline are checked free-running with the real "
        "engine on the calibration prompts; the pick must then hold the target free-running on the "
        "held-out prompts or the file ships 'no exit'. agreement and layers_saved are the calibration "
        "prompts' free-running figures.",
        "offline_agreement": choice.best.row.agreement if choice else None,
        "sweep": {
            "settings": len(settings.v7),
            "taus": sorted({p.tau for p in settings.v7}),
            "ks": sorted({p.k for p in settings.v7}),
            "min_layers": sorted({p.min_layer or 1 for p in settings.v7}),
            "families": sorted(tables),
        },
        "checked": [c.to_dict() for c in [*failed_checks, *(c for ch in choices for c in ch.checked)]],
        "unreachable": failures,
    }
    reason = None if choice else f"no setting holds agreement {target:g} free-running: " + "; ".join(failures)
    if choice and choice.best.runtime.layers_saved < min_layers_saved:
        # Deciding, propagating K/V and batching exits cost more than a few layers save.
        reason = too_little_saved(choice.policy, choice.best.runtime.layers_saved, min_layers_saved)
        details["best_candidate"] = {
            "policy": policy_to_dict(choice.policy),
            "agreement": choice.best.runtime.agreement,
            "layers_saved": choice.best.runtime.layers_saved,
        }
        choice = None
    policy = choice.policy if choice else ExitPolicy.disabled()
    calibration = Calibration(
        model=loaded.name,
        num_layers=traces.num_layers,
        policy=policy,
        target_agreement=target,
        agreement=choice.best.runtime.agreement if choice else 1.0,
        layers_saved=choice.best.runtime.layers_saved if choice else 0.0,
        dtype=dtype_name(model_adapter.dtype),
        adapters=adapter_entry,
        probes={"file": None, "judged_with": "2-fold cross-fitted probes (offline sweep)"}
        if probes
        else None,
        reason=reason,
        details=details,
    )
    if validate_on:
        details["validation"] = validate(
            loaded, calibration, adapters, probes, validate_on, max_new_tokens, progress
        )
    timings["total_s"] = round(time.perf_counter() - clock, 1)
    details["seconds"] = timings["total_s"]
    return CalibrationRun(calibration, choice, traces, adapters, adapter_choice, probes, timings)


def free_running_folds(
    loaded: LoadedModel,
    prompt_ids: list[list[int]],
    policy: ExitPolicy,
    max_new_tokens: int,
    fold_adapters: list[ExitAdapters] | None = None,
    probes: ExitProbes | None = None,
    progress: bool = True,
) -> TeacherForcedResult:
    """:func:`free_running` on ``prompt_ids``; with ``fold_adapters``, prompt ``i`` is read through
    ``fold_adapters[i % folds]`` (adapters fitted without it)."""
    if not fold_adapters:
        return free_running(loaded, prompt_ids, policy, max_new_tokens, probes=probes, progress=progress)
    folds = len(fold_adapters)
    parts = [
        free_running(
            loaded, prompt_ids[fold::folds], policy, max_new_tokens, adapters, probes, progress=progress
        )
        for fold, adapters in enumerate(fold_adapters)
    ]
    return TeacherForcedResult.from_tokens(
        [m for p in parts for m in p.matches], [e for p in parts for e in p.exit_layers], loaded.num_layers
    )


def validate(
    loaded: LoadedModel,
    calibration: Calibration,
    adapters: ExitAdapters | None,
    probes: ExitProbes | None,
    prompts: str,
    max_new_tokens: int,
    progress: bool = True,
) -> dict:
    """Each pick (plain, and with adapters) free-running on ``prompts`` (never the calibration
    prompts). A pick below its target there is withdrawn: the calibration then ships no exit."""
    from sedac_ray.engine import Engine

    prompt_ids = encode_prompts(Engine(loaded, ExitPolicy.disabled()), load_prompts(prompts))
    target = calibration.target_agreement
    result = {"prompts": prompts, "num_prompts": len(prompt_ids)}
    if calibration.policy.enabled:
        plain = free_running(
            loaded, prompt_ids, calibration.policy, max_new_tokens, probes=probes, progress=progress
        )
        result["engine_free_running"] = {"policy": calibration.policy.describe(), **plain.to_dict()}
        if plain.agreement + 1e-12 < target:
            calibration.reason = (
                f"{calibration.policy.describe()} held {plain.agreement:.4f} < {target:g} free-running on "
                f"the {prompts} prompts"
            )
            calibration.policy = ExitPolicy.disabled()
            calibration.layers_saved, calibration.agreement = 0.0, 1.0
    adapter_policy = calibration.adapter_policy
    if adapters is not None and adapter_policy is not None and adapter_policy.enabled:
        adapted = free_running(
            loaded, prompt_ids, adapter_policy, max_new_tokens, adapters, probes, progress=progress
        )
        result["engine_free_running_with_adapters"] = {
            "policy": adapter_policy.describe(),
            **adapted.to_dict(),
        }
        if adapted.agreement + 1e-12 < target:
            calibration.adapters["policy"] = policy_to_dict(ExitPolicy.disabled())
            calibration.adapters["reason"] = f"held {adapted.agreement:.4f} < {target:g} on {prompts}"
    return result


def write(run: CalibrationRun, output: str | Path | None = None) -> Path:
    """Write the calibration file (default: the user's calibration folder, named after the model
    and dtype) and, if fitted, the adapter and probe files beside it."""
    calibration = run.calibration
    path = (
        Path(output)
        if output
        else user_calibration_dir() / calibration_file_name(calibration.model, calibration.dtype)
    )
    stem = path.name.removesuffix(".json")
    if run.adapters is not None:
        calibration.adapters["file"] = f"{stem}.adapters.safetensors"
        run.adapters.save(path.with_name(calibration.adapters["file"]), metadata={"model": calibration.model})
    if run.probes is not None:
        calibration.probes["file"] = f"{stem}.probes.safetensors"
        run.probes.save(path.with_name(calibration.probes["file"]), metadata={"model": calibration.model})
    return calibration.save(path)
