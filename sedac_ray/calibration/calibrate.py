"""``sedac calibrate``: choose a model's default exit policy from its own quality/savings trade-off.

1. Record teacher-forced traces of the calibration prompts (:mod:`.traces`).
2. Sweep the V7 rule over tau x K x min_layer offline and measure, per setting, the agreement with
   the full model's greedy tokens and the share of layers saved (:mod:`.sweep`).
3. The offline numbers ignore state propagation (earlier exited tokens' deeper K/V), which costs
   agreement in the real runtime. So the settings on the offline Pareto front that reach the target
   are checked with the real runtime, teacher-forced, on the same calibration prompts
   (:mod:`.validate`), by bisection along the front (agreement falls as savings grow).
4. Pick the checked setting that saves the most layers with runtime agreement >= the target.
5. Optionally fit exit adapters and pick a second setting for use with them, judged on
   cross-fitted adapters (each prompt read through adapters fitted without it).
6. Check the pick on the held-out prompts, and write ``<model>.json`` (and
   ``<model>.adapters.safetensors``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sedac_ray.exit_adapters import ExitAdapters
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import LoadedModel

from .adapter_fit import DEFAULT_RANK, DEFAULT_RIDGE, cross_fitted_readout, fit_exit_adapters
from .prompts import load_prompts
from .store import Calibration, calibration_file_name, policy_to_dict, user_calibration_dir
from .sweep import V7, SweepGrid, SweepRow, SweepTable, build_settings, policy_from_setting, sweep
from .traces import Traces, greedy_continuations, record_traces
from .validate import TeacherForcedResult, teacher_forced, teacher_forced_cross_fitted


@dataclass
class Checked:
    """One offline sweep row, checked with the real runtime on the calibration prompts."""

    row: SweepRow
    runtime: TeacherForcedResult

    def to_dict(self) -> dict:
        return {
            "setting": self.row.setting,
            "offline_agreement": self.row.agreement,
            "runtime_agreement": self.runtime.agreement,
            "runtime_layers_saved": self.runtime.layers_saved,
        }


@dataclass
class Choice:
    table: SweepTable  # the offline V7 sweep
    checked: list[Checked]  # the rows checked with the runtime, in the order they were checked
    best: Checked  # the checked row saving the most layers at runtime agreement >= target

    @property
    def policy(self):
        return policy_from_setting(self.best.row.setting)


@dataclass
class CalibrationRun:
    calibration: Calibration
    choice: Choice
    traces: Traces
    adapters: ExitAdapters | None = None
    adapter_choice: Choice | None = None
    timings: dict = field(default_factory=dict)


class TargetUnreachable(ValueError):
    pass


def choose(table: SweepTable, target: float, check) -> Choice:
    """Bisect the offline V7 Pareto front (rows with offline agreement >= ``target``, most layers
    saved first) with ``check(row) -> TeacherForcedResult``; return the checked row that saves the
    most layers with runtime agreement >= ``target``."""
    front = [r for r in table.pareto(V7) if r.agreement + 1e-12 >= target]
    front.sort(key=lambda r: (-r.layers_saved, r.agreement))
    if not front:
        best = max(r.agreement for r in table.family(V7))
        raise TargetUnreachable(
            f"no swept setting reaches agreement {target:g} offline (best {best:.4f}); lower the target"
        )
    checked: dict[int, Checked] = {}

    def passes(i: int) -> bool:
        if i not in checked:
            checked[i] = Checked(front[i], check(front[i]))
        return checked[i].runtime.agreement + 1e-12 >= target

    low, high = 0, len(front) - 1
    if not passes(high):
        raise TargetUnreachable(
            f"even the most conservative setting on the front ({front[high].setting}) reaches only "
            f"{checked[high].runtime.agreement:.4f} agreement in the runtime; lower the target"
        )
    while low < high:  # the first front index that passes, assuming agreement falls with savings
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    passing = [c for c in checked.values() if c.runtime.agreement + 1e-12 >= target]
    best = max(passing, key=lambda c: (c.runtime.layers_saved, c.runtime.agreement))
    return Choice(table=table, checked=list(checked.values()), best=best)


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
) -> CalibrationRun:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    clock = time.perf_counter()
    timings = {}
    items = load_prompts(prompts)
    if traces is None:
        traces = record_traces(loaded, items, max_new_tokens, keep_hidden=fit_adapters, cache=cache)
    timings["traces_s"] = round(time.perf_counter() - clock, 1)
    model_adapter = ModelAdapter(loaded.model, verify=False)
    settings = build_settings(traces, grid, families={V7})
    table = sweep(traces, settings, progress=progress)
    timings["sweep_s"] = round(time.perf_counter() - clock - timings["traces_s"], 1)

    def runtime(row: SweepRow, fold_adapters=None) -> TeacherForcedResult:
        """The row's policy in the real runtime on the calibration prompts (each bar says which)."""
        policy = policy_from_setting(row.setting)
        if fold_adapters is None:
            return teacher_forced(
                model_adapter, traces.prompt_ids, traces.continuations, policy, progress=progress
            )
        return teacher_forced_cross_fitted(
            model_adapter, traces.prompt_ids, traces.continuations, policy, fold_adapters, progress=progress
        )

    choice = choose(table, target, runtime)
    adapters = adapter_choice = adapter_entry = None
    if fit_adapters:
        readout, fold_adapters = cross_fitted_readout(model_adapter, traces, rank=adapter_rank)
        adapter_table = sweep(traces, settings, readout=readout, progress=progress)
        adapter_choice = choose(adapter_table, target, lambda row: runtime(row, fold_adapters))
        adapters = fit_exit_adapters(traces.hidden, rank=adapter_rank)
        adapter_entry = {
            "file": calibration_file_name(loaded.name).replace(".json", ".adapters.safetensors"),
            "policy": policy_to_dict(adapter_choice.policy),
            "agreement": adapter_choice.best.runtime.agreement,
            "layers_saved": adapter_choice.best.runtime.layers_saved,
            "offline_agreement": adapter_choice.best.row.agreement,
            "rank": adapter_rank,
            "ridge": DEFAULT_RIDGE,
            "judged_with": "2-fold cross-fitted adapters on the calibration prompts",
            "checked": [c.to_dict() for c in adapter_choice.checked],
        }

    details = {
        "calibrated_on": {
            "prompts": prompts,
            "num_prompts": len(items),
            "decode_tokens": len(traces),
            "max_new_tokens": max_new_tokens,
            "dtype": str(model_adapter.dtype).replace("torch.", ""),
            "device": str(model_adapter.device),
        },
        "method": "agreement = the exit token equals the full model's greedy token on the same prefix "
        "(decode tokens; the prefill token always runs every layer). Offline sweep on teacher-forced "
        "traces, then the Pareto-front settings that reach the target offline are checked with the "
        "real runtime (teacher-forced, state propagation included); agreement and layers_saved are "
        "the runtime's.",
        "offline_agreement": choice.best.row.agreement,
        "sweep": {
            "settings": len(settings.v7),
            "taus": sorted({p.tau for p in settings.v7}),
            "ks": sorted({p.k for p in settings.v7}),
            "min_layers": sorted({p.min_layer or 1 for p in settings.v7}),
        },
        "checked": [c.to_dict() for c in choice.checked],
    }
    calibration = Calibration(
        model=loaded.name,
        num_layers=traces.num_layers,
        policy=choice.policy,
        target_agreement=target,
        agreement=choice.best.runtime.agreement,
        layers_saved=choice.best.runtime.layers_saved,
        adapters=adapter_entry,
        details=details,
    )
    if validate_on:
        details["validation"] = validate(loaded, calibration, adapters, validate_on, max_new_tokens, progress)
    timings["total_s"] = round(time.perf_counter() - clock, 1)
    details["seconds"] = timings["total_s"]
    return CalibrationRun(calibration, choice, traces, adapters, adapter_choice, timings)


def validate(
    loaded: LoadedModel,
    calibration: Calibration,
    adapters: ExitAdapters | None,
    prompts: str,
    max_new_tokens: int,
    progress: bool = True,
) -> dict:
    """The calibrated policy (and its adapter variant) with the real runtime, teacher-forced, on
    ``prompts`` (never the calibration prompts)."""
    prompt_ids, continuations = greedy_continuations(loaded, load_prompts(prompts), max_new_tokens)
    model_adapter = ModelAdapter(loaded.model, verify=False)
    plain = teacher_forced(model_adapter, prompt_ids, continuations, calibration.policy, progress=progress)
    result = {"prompts": prompts, "num_prompts": len(prompt_ids), "engine_teacher_forced": plain.to_dict()}
    if adapters is not None and calibration.adapter_policy is not None:
        with_adapters = teacher_forced(
            model_adapter, prompt_ids, continuations, calibration.adapter_policy, adapters, progress=progress
        )
        result["engine_teacher_forced_with_adapters"] = with_adapters.to_dict()
    return result


def write(run: CalibrationRun, output: str | Path | None = None) -> Path:
    """Write the calibration file (default: the user's calibration folder) and, if fitted, the
    adapter file beside it."""
    path = Path(output) if output else user_calibration_dir() / calibration_file_name(run.calibration.model)
    if run.adapters is not None:
        adapter_file = path.with_name(path.name.removesuffix(".json") + ".adapters.safetensors")
        run.calibration.adapters["file"] = adapter_file.name
        run.adapters.save(adapter_file, metadata={"model": run.calibration.model})
    return run.calibration.save(path)
