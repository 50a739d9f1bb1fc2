"""``sedac bench quality``: every exit policy family on the same prompts, side by side.

* Settings of each family (V7, window, probe, V7+probe, V6, CALM) are chosen on the calibration
  prompts for each target agreement, then judged unchanged on the held-out prompts, offline
  (traces). Probe families read cross-fitted probe scores on the calibration prompts and probes
  fitted on all of them for the held-out ones (plain head readout only).
* The oracle frontier and the stable oracle come from the held-out traces themselves (bounds).
* With exit adapters: the same, on a cross-fitted readout for the calibration prompts and on
  adapters fitted on all calibration prompts for the held-out ones.
* V7, window, probe and V7+probe points (the rules the engine runs) are also judged with the real
  runtime on the held-out prompts, teacher-forced and free-running (the policy writes its own text),
  and timed with the engine at batch 1 and batch 8 (wall clock, paired with no exit).
* The model's calibration file, if any, gets its own row: its held-out runtime agreement is the
  number to compare with its target.

Writes ``quality.json``, ``quality.md`` and three PNG plots.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sedac_ray.exit_adapters import ExitAdapters
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import LoadedModel
from sedac_ray.policy import ExitPolicy

from .adapter_fit import DEFAULT_RANK, DEFAULT_RIDGE, cross_fitted_readout, fit_exit_adapters
from .policies import score, stability_exits
from .probe_fit import PROBE, V7_PROBE, cross_fitted_probe_scores, fit_trace_probes, probe_table
from .prompts import load_prompts
from .store import calibrated_default
from .sweep import (
    CALM,
    FAMILY_TITLES,
    NO_EXIT,
    ORACLE,
    STABLE_ORACLE,
    V6,
    V7,
    WINDOW,
    SweepGrid,
    SweepRow,
    SweepTable,
    build_settings,
    policy_from_setting,
    sweep,
)
from .traces import Traces, as_engine_prompt, head_readout, record_traces
from .validate import free_running, teacher_forced

METHOD = (
    "agreement = share of decode tokens whose exit token equals the full model's greedy token on "
    "the same prefix (teacher-forced on the full model's greedy continuation; the prefill token is "
    "not counted); layers saved = 1 - mean layers executed / L. 'offline' numbers come from "
    "recorded traces; 'runtime' numbers from the engine's LayerRange, teacher-forced, with state "
    "propagation of exited tokens' K/V; 'free-running' numbers from the engine generating with the "
    "policy, each token compared with the full model's greedy token on the prefix the policy wrote."
)
TABLE_HEADER = [
    "policy",
    "readout",
    "target",
    "setting",
    "cal. agreement",
    "held-out agreement (offline)",
    "held-out saved (offline)",
    "held-out agreement (runtime)",
    "held-out saved (runtime)",
    "held-out agreement (free-running)",
    "held-out saved (free-running)",
    "tok/s",
    "speedup",
    "speedup, batch 8",
]
CHOSEN_FAMILIES = (V7, WINDOW, PROBE, V7_PROBE, V6, CALM)
ENGINE_FAMILIES = (V7, WINDOW, PROBE, V7_PROBE)  # the rules the serving engine runs
TITLES = {**FAMILY_TITLES, PROBE: "exit probe (logistic)", V7_PROBE: "V7 and exit probe"}
WALLCLOCK_BATCH = 8  # the second wall-clock column; the first is batch 1
PLAIN, ADAPTED = "plain", "adapters"


@dataclass
class Variant:
    """Sweeps of one readout (plain head, or head behind exit adapters) on both prompt sets."""

    name: str
    calibration: SweepTable
    heldout: SweepTable
    adapters: ExitAdapters | None = None


class QualityBench:
    def __init__(
        self,
        loaded: LoadedModel,
        targets: list[float] | tuple[float, ...] = (0.95, 0.99),
        max_new_tokens: int = 40,
        fit_adapters: bool = True,
        wallclock_rounds: int = 3,
        calibration_prompts: str = "calibration",
        eval_prompts: str = "heldout",
        grid: SweepGrid | None = None,
        wallclock_prompts: int = 3,
        wallclock_tokens: int = 32,
        adapter_rank: int | None = DEFAULT_RANK,
        progress: bool = True,
        cache: bool = True,
    ):
        self.loaded = loaded
        self.targets = sorted(targets)
        self.max_new_tokens = max_new_tokens
        self.fit_adapters = fit_adapters
        self.wallclock_rounds = wallclock_rounds
        self.calibration_prompts, self.eval_prompts = calibration_prompts, eval_prompts
        self.grid = grid or SweepGrid()
        self.wallclock_prompts, self.wallclock_tokens = wallclock_prompts, wallclock_tokens
        self.adapter_rank = adapter_rank
        self.progress = progress
        self.cache = cache
        self.model_adapter = ModelAdapter(loaded.model, verify=False)
        self.num_layers = self.model_adapter.num_layers
        self.probes = None  # fitted on the calibration traces in measure()
        self.result: dict = {}

    # ---- measuring ------------------------------------------------------------------------

    def run(self, out_dir: str | Path) -> list[Path]:
        self.measure()
        return self.write(out_dir)

    def measure(self) -> dict:
        clock = time.perf_counter()
        calibration, heldout = (
            record_traces(self.loaded, load_prompts(name), self.max_new_tokens, True, cache=self.cache)
            for name in (self.calibration_prompts, self.eval_prompts)
        )
        self.heldout = heldout
        settings = build_settings(calibration, self.grid)
        cross_scores, _ = cross_fitted_probe_scores(calibration)
        self.probes = fit_trace_probes(calibration)
        variants = [
            Variant(
                PLAIN,
                _joined(
                    sweep(calibration, settings, progress=self.progress),
                    probe_table(calibration, cross_scores),
                ),
                _joined(
                    sweep(heldout, settings, progress=self.progress),
                    probe_table(heldout, self.probes.scores(heldout.hidden)),
                ),
            )
        ]
        if self.fit_adapters:
            cross, _ = cross_fitted_readout(self.model_adapter, calibration, rank=self.adapter_rank)
            adapters = fit_exit_adapters(calibration.hidden, rank=self.adapter_rank)
            readout = head_readout(
                self.model_adapter, heldout.hidden, adapters, desc="held-out readout, adapters"
            )
            variants.append(
                Variant(
                    ADAPTED,
                    sweep(calibration, settings, readout=cross, progress=self.progress),
                    sweep(heldout, settings, readout=readout, progress=self.progress),
                    adapters,
                )
            )
        self.variants = variants
        rows = [row for variant in variants for row in self._chosen_rows(variant)]
        rows += self._calibrated_default_rows()
        self._runtime_checks(rows, heldout)
        if self.wallclock_rounds > 0:
            self._wallclock(rows)
        self.result = {
            "model": self.loaded.name,
            "num_layers": self.num_layers,
            "dtype": str(self.model_adapter.dtype).replace("torch.", ""),
            "device": str(self.model_adapter.device),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "prompts": {
                "calibration": {
                    "set": self.calibration_prompts,
                    "prompts": calibration.num_prompts,
                    "tokens": len(calibration),
                },
                "heldout": {"set": self.eval_prompts, "prompts": heldout.num_prompts, "tokens": len(heldout)},
                "max_new_tokens": self.max_new_tokens,
            },
            "method": METHOD,
            "adapters": None
            if not self.fit_adapters
            else {
                "rank": self.adapter_rank,
                "ridge": DEFAULT_RIDGE,
                "parameters": variants[1].adapters.num_parameters(),
                "calibration_readout": "2-fold cross-fitted",
            },
            "targets": self.targets,
            "rows": rows,
            "pareto": {
                variant.name: {
                    "calibration": self._fronts(variant.calibration),
                    "heldout": self._fronts(variant.heldout),
                }
                for variant in variants
            },
            "seconds": round(time.perf_counter() - clock, 1),
        }
        return self.result

    def _chosen_rows(self, variant: Variant) -> list[dict]:
        rows = []
        for family in CHOSEN_FAMILIES:
            if not variant.calibration.family(family):
                continue  # probe families: plain readout only
            for target in self.targets:
                chosen = variant.calibration.best_at(family, target)
                row = {"family": family, "readout": variant.name, "target": target}
                if chosen is None:
                    rows.append({**row, "setting": None, "note": "no swept setting reaches the target"})
                    continue
                index = variant.calibration.index_of(chosen)
                held = variant.heldout.family(family)[index]
                rows.append(
                    {
                        **row,
                        "setting": chosen.setting,
                        "calibration": _point(chosen),
                        "heldout": _point(held),
                        "_exit_layers": variant.heldout.exit_layers[family][index],
                    }
                )
        for target in self.targets:
            rows.append(
                {
                    "family": ORACLE,
                    "readout": variant.name,
                    "target": target,
                    "setting": {},
                    "calibration": _frontier_point(variant.calibration, target),
                    "heldout": _frontier_point(variant.heldout, target),
                }
            )
        for family in (STABLE_ORACLE, NO_EXIT) if variant.name == PLAIN else (STABLE_ORACLE,):
            (cal,), (held,) = variant.calibration.family(family), variant.heldout.family(family)
            rows.append(
                {
                    "family": family,
                    "readout": variant.name,
                    "target": None,
                    "setting": {},
                    "calibration": _point(cal),
                    "heldout": _point(held),
                    "_exit_layers": variant.heldout.exit_layers[family][0],
                }
            )
        return rows

    def _calibrated_default_rows(self) -> list[dict]:
        calibration, source = calibrated_default(self.loaded.name, self.num_layers, self.loaded.model.dtype)
        self.calibration_file = None if calibration is None else str(calibration.path)
        if calibration is None or not calibration.policy.enabled or calibration.policy.tau is None:
            return []  # no exit, or a probe policy: the stability-only columns cannot show it
        row = {
            "family": V7,
            "readout": PLAIN,
            "target": calibration.target_agreement,
            "setting": {
                "tau": calibration.policy.tau,
                "k": calibration.policy.k,
                "min_layer": calibration.policy.min_layer or 1,
            },
            "calibrated_default": source,
            "calibration": {"agreement": calibration.agreement, "layers_saved": calibration.layers_saved},
        }
        layers = stability_exits(self.heldout.stabilities, [calibration.policy])
        agreement, mean_layers = score(self.heldout.readout, self.heldout.reference, layers)
        row["heldout"] = {
            "agreement": float(agreement[0]),
            "layers_saved": 1.0 - float(mean_layers[0]) / self.num_layers,
            "mean_layers": float(mean_layers[0]),
        }
        return [row]

    def _runtime_checks(self, rows: list[dict], heldout: Traces) -> None:
        adapters = {v.name: v.adapters for v in self.variants}
        checks = [r for r in rows if r["family"] in ENGINE_FAMILIES and r.get("setting")]
        for row in tqdm(
            checks, desc="runtime checks (held-out)", unit="policy", leave=False, disable=not self.progress
        ):
            policy = policy_from_setting(row["setting"])
            result = teacher_forced(
                self.model_adapter,
                heldout.prompt_ids,
                heldout.continuations,
                policy,
                adapters.get(row["readout"]),
                progress=False,
                probes=self.probes,
            )
            row["heldout_runtime"] = result.to_dict()
            if "calibrated_default" in row:
                row["_exit_layers"] = torch.tensor(result.exit_layers)
            row["heldout_free_running"] = free_running(
                self.loaded,
                heldout.prompt_ids,
                policy,
                self.max_new_tokens,
                adapters.get(row["readout"]),
                probes=self.probes,
                progress=False,
            ).to_dict()

    def _wallclock(self, rows: list[dict]) -> None:
        """Free-running greedy generation with the engine, fixed length: at batch 1 (the first
        ``wallclock_prompts`` chat prompts one after another, row key ``wallclock``) and at batch
        8 (eight chat prompts in one batch, ``wallclock_batch8``). Each timed run is paired with a
        no-exit run right before it, and the speedup is the median of the pairs' ratios: on a
        shared machine the load drifts, and a pair sees about the same load."""
        from sedac_ray.engine import Engine

        chats = [as_engine_prompt(p.prompt) for p in load_prompts(self.eval_prompts) if p.chat]
        groups = {
            1: [[c] for c in chats[: self.wallclock_prompts]],
            WALLCLOCK_BATCH: [chats[:WALLCLOCK_BATCH]],
        }
        adapters = {v.name: v.adapters for v in self.variants}
        timed = [r for r in rows if r["family"] in ENGINE_FAMILIES and r.get("setting")]
        engines = {PLAIN: Engine(self.loaded, ExitPolicy.disabled(), probes=self.probes)}
        if len(self.variants) > 1:
            engines[ADAPTED] = Engine(
                self.loaded, ExitPolicy.disabled(), adapters=adapters[ADAPTED], probes=self.probes
            )

        def seconds(readout: str, policy: ExitPolicy, batch: int) -> float:
            start = time.perf_counter()
            for group in groups[batch]:
                engines[readout].generate(
                    group,
                    max_new_tokens=self.wallclock_tokens,
                    chat=True,
                    policy=policy,
                    ignore_eos=True,
                )
            return time.perf_counter() - start

        pairs: dict[tuple[int, int], list[tuple[float, float]]] = {
            (i, batch): [] for i in range(len(timed)) for batch in groups
        }
        total = self.wallclock_rounds * len(pairs)
        with tqdm(total=total, desc="wall clock", unit="pair", leave=False, disable=not self.progress) as bar:
            for _ in range(self.wallclock_rounds):
                for (i, batch), runs in pairs.items():
                    baseline = seconds(PLAIN, ExitPolicy.disabled(), batch)
                    policy = policy_from_setting(timed[i]["setting"])
                    runs.append((baseline, seconds(timed[i]["readout"], policy, batch)))
                    bar.update()
        self.wallclock_baseline = {"runs": sum(len(runs) for runs in pairs.values())}
        for batch, batch_groups in groups.items():
            tokens = sum(len(g) for g in batch_groups) * self.wallclock_tokens
            baselines = [b for (_, size), runs in pairs.items() if size == batch for b, _ in runs]
            key = "tokens_per_s" if batch == 1 else f"tokens_per_s_batch{batch}"
            self.wallclock_baseline[key] = tokens / statistics.median(baselines)
            for i, row in enumerate(timed):
                runs = pairs[(i, batch)]
                row["wallclock" if batch == 1 else f"wallclock_batch{batch}"] = {
                    "tokens_per_s": tokens / statistics.median(t for _, t in runs),
                    "speedup_vs_no_exit": statistics.median(b / t for b, t in runs),
                    "pairs_seconds": runs,
                    "prompts": sum(len(g) for g in batch_groups),
                    "batch": batch,
                    "tokens_per_prompt": self.wallclock_tokens,
                }

    def _fronts(self, table: SweepTable) -> dict:
        fronts = {
            family: [[round(r.agreement, 5), round(r.layers_saved, 5)] for r in table.pareto(family)]
            for family in CHOSEN_FAMILIES
            if table.family(family)
        }
        fronts[ORACLE] = [[round(r.agreement, 5), round(r.layers_saved, 5)] for r in table.family(ORACLE)]
        return fronts

    # ---- output -------------------------------------------------------------------------------

    def write(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = dict(self.result)
        data["rows"] = [
            {k: v for k, v in row.items() if not k.startswith("_")} for row in self.result["rows"]
        ]
        data["calibration_file"] = self.calibration_file
        if hasattr(self, "wallclock_baseline"):
            data["wallclock_no_exit"] = self.wallclock_baseline
        paths = [out / "quality.json", out / "quality.md"]
        paths[0].write_text(json.dumps(data, indent=1) + "\n")
        paths[1].write_text(self.markdown() + "\n")
        paths += self.plot(out)
        return paths

    def markdown(self) -> str:
        result = dict(
            self.result,
            rows=[{k: v for k, v in r.items() if not k.startswith("_")} for r in self.result["rows"]],
        )
        if hasattr(self, "wallclock_baseline"):
            result["wallclock_no_exit"] = self.wallclock_baseline
        return render_markdown(result)

    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        paths = [out / "quality_pareto.png", out / "quality_exit_layers.png", out / "quality_stability.png"]
        colors = {
            V7: "tab:blue",
            WINDOW: "tab:cyan",
            PROBE: "tab:purple",
            V7_PROBE: "tab:pink",
            V6: "tab:green",
            CALM: "tab:orange",
            ORACLE: "black",
        }

        figure, axes = plt.subplots(
            1, len(self.variants), figsize=(6.5 * len(self.variants), 5), squeeze=False
        )
        for axis, variant in zip(axes[0], self.variants, strict=True):
            for family in (*CHOSEN_FAMILIES, ORACLE):
                front = variant.heldout.pareto(family) if family != ORACLE else variant.heldout.family(ORACLE)
                if front:
                    axis.plot(
                        [r.agreement for r in front],
                        [100 * r.layers_saved for r in front],
                        color=colors[family],
                        label=TITLES[family],
                        # steps-pre: between two front points only the less saving one is reachable
                        drawstyle="steps-pre" if family != ORACLE else "default",
                        linestyle="--" if family == ORACLE else "-",
                    )
            for row in self.result["rows"]:
                if row["readout"] != variant.name or not row.get("heldout") or row["family"] not in colors:
                    continue
                axis.scatter(
                    row["heldout"]["agreement"],
                    100 * row["heldout"]["layers_saved"],
                    color=colors[row["family"]],
                    s=25,
                )
                if "heldout_runtime" in row:
                    runtime = row["heldout_runtime"]
                    axis.scatter(
                        runtime["agreement"],
                        100 * runtime["layers_saved"],
                        facecolors="none",
                        edgecolors=colors[row["family"]],
                        s=60,
                    )
            default = next(
                (
                    r
                    for r in self.result["rows"]
                    if "calibrated_default" in r and r["readout"] == variant.name
                ),
                None,
            )
            if default:
                runtime = default["heldout_runtime"]
                axis.scatter(
                    runtime["agreement"],
                    100 * runtime["layers_saved"],
                    marker="D",
                    color="tab:red",
                    s=40,
                    label=f"calibrated default (runtime), target {default['target']:g}",
                )
            stable = variant.heldout.family(STABLE_ORACLE)[0]
            axis.scatter(
                stable.agreement,
                100 * stable.layers_saved,
                marker="*",
                color="black",
                s=80,
                label=FAMILY_TITLES[STABLE_ORACLE],
            )
            for target in self.targets:
                axis.axvline(target, color="grey", linewidth=0.6, linestyle=":")
            low = 0.6
            axis.set_xlim(low, 1.002)
            visible = [r.layers_saved for r in variant.heldout.rows if r.agreement >= low]
            axis.set_ylim(0, 100 * max(visible) + 3)
            axis.set_xlabel("agreement with the full model (held-out, offline)")
            axis.set_ylabel("layers saved (%)")
            title = "plain head readout" if variant.name == PLAIN else "with exit adapters"
            axis.set_title(
                f"{self.loaded.name}: {title}\n(dots: settings chosen on calibration; rings: runtime)",
                fontsize=9,
            )
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="upper right")
        figure.tight_layout()
        figure.savefig(paths[0], dpi=120)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(7, 4))
        bins = torch.arange(0.5, self.num_layers + 1.5).tolist()
        target = self.targets[0]
        for row in self.result["rows"]:
            if row["readout"] != PLAIN or "_exit_layers" not in row:
                continue
            if row["family"] in CHOSEN_FAMILIES and row["target"] != target:
                continue
            if row["family"] == NO_EXIT:
                continue
            label = TITLES.get(row["family"], row["family"])
            if "calibrated_default" in row:
                label = f"calibrated default (runtime), target {row['target']:g}"
            elif row["family"] in CHOSEN_FAMILIES:
                label += f" @ {target:g}"
            axis.hist(row["_exit_layers"].tolist(), bins=bins, histtype="step", linewidth=1.3, label=label)
        axis.set_yscale("log")
        axis.set_xlabel("exit layer (layers executed)")
        axis.set_ylabel("decode tokens (held-out)")
        axis.set_title(f"{self.loaded.name}: where tokens exit", fontsize=10)
        axis.legend(fontsize=7, loc="upper left")
        figure.tight_layout()
        figure.savefig(paths[1], dpi=120)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(9, 4))
        stabilities = self.heldout.stabilities[:, 1:].numpy()
        axis.boxplot(stabilities, showfliers=False, whis=(5, 95))
        axis.set_xticks(
            range(1, self.num_layers), [str(layer) for layer in range(2, self.num_layers + 1)], fontsize=7
        )
        default = next((r for r in self.result["rows"] if "calibrated_default" in r), None)
        if default:
            axis.axhline(
                default["setting"]["tau"],
                color="tab:red",
                linewidth=0.8,
                label=f"calibrated tau {default['setting']['tau']:g}",
            )
            axis.legend(fontsize=8, loc="lower left")
        axis.set_xlabel("layer l")
        axis.set_ylabel("stability s_l = cos(h_l, h_(l-1))")
        axis.set_title(
            f"{self.loaded.name}: stability per layer (held-out decode tokens; boxes 25-75%, whiskers 5-95%)",
            fontsize=9,
        )
        figure.tight_layout()
        figure.savefig(paths[2], dpi=120)
        plt.close(figure)
        return paths


def render_markdown(result: dict) -> str:
    """``quality.md`` from the content of ``quality.json``: a summary table, then every row."""
    held = result["prompts"]["heldout"]
    cal = result["prompts"]["calibration"]
    lines = [
        f"Quality vs layers saved, {result['model']} ({result['num_layers']} layers, {result['dtype']}, "
        f"{result['device']}). Settings chosen on the calibration prompts ({cal['prompts']} prompts, "
        f"{cal['tokens']} decode tokens) for each target; judged on held-out prompts ({held['prompts']} "
        f"prompts, {held['tokens']} decode tokens). Agreement: exit token = the full model's greedy "
        "token on the same prefix. Offline: recorded traces; runtime: the engine's LayerRange, "
        "teacher-forced, with state propagation; free-running: the engine writes its own text with "
        "the policy.",
        "",
        *summary_table(result["rows"]),
        "",
        "All rows:",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
        *(_markdown_row(row) for row in result["rows"]),
    ]
    baseline = result.get("wallclock_no_exit")
    if baseline:
        batched = baseline.get(f"tokens_per_s_batch{WALLCLOCK_BATCH}")
        also = f", batch {WALLCLOCK_BATCH} {batched:.1f} tok/s" if batched else ""
        lines += [
            "",
            "Wall clock: engine, greedy, fixed length; no exit at batch 1 "
            f"{baseline['tokens_per_s']:.1f} tok/s (median){also}. Speedup: the median over runs of "
            "(no-exit run time / run time), each run right after its own no-exit run.",
        ]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> list[str]:
    """One line per policy and target: plain readout, runtime, wall clock, and with adapters."""
    header = [
        "policy",
        "target",
        "setting (chosen on calibration)",
        "agreement",
        "layers saved",
        "runtime agreement",
        "runtime saved",
        "free-running agreement",
        "free-running saved",
        "speedup",
        f"speedup, batch {WALLCLOCK_BATCH}",
        "with adapters: agreement",
        "with adapters: saved",
    ]
    adapted = {(r["family"], r.get("target")): r for r in rows if r["readout"] == ADAPTED}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["readout"] != PLAIN or row["family"] == NO_EXIT:
            continue
        held = row.get("heldout") or {}
        runtime = row.get("heldout_runtime") or {}
        free = row.get("heldout_free_running") or {}
        twin = {} if "calibrated_default" in row else adapted.get((row["family"], row.get("target")), {})
        twin_held = twin.get("heldout") or {}
        name = TITLES.get(row["family"], row["family"])
        if "calibrated_default" in row:
            name = "**V7 calibrated default** (shipped file)"
        cells = [
            name,
            "-" if row.get("target") is None else f"{row['target']:g}",
            _describe_setting(row),
            _fmt(held.get("agreement")),
            _fmt(held.get("layers_saved"), percent=True),
            _fmt(runtime.get("agreement")),
            _fmt(runtime.get("layers_saved"), percent=True),
            _fmt(free.get("agreement")),
            _fmt(free.get("layers_saved"), percent=True),
            _speedup(row.get("wallclock")),
            _speedup(row.get(f"wallclock_batch{WALLCLOCK_BATCH}")),
            _fmt(twin_held.get("agreement")),
            _fmt(twin_held.get("layers_saved"), percent=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _point(row: SweepRow) -> dict:
    return {"agreement": row.agreement, "layers_saved": row.layers_saved, "mean_layers": row.mean_layers}


def _frontier_point(table: SweepTable, target: float) -> dict:
    row = next((r for r in table.family(ORACLE) if r.agreement + 1e-12 >= target), None)
    return _point(row) if row else {"agreement": None, "layers_saved": None, "mean_layers": None}


def _describe_setting(row: dict) -> str:
    setting = row.get("setting")
    if setting is None:
        return "(none reaches target)"
    if row["family"] in (V7, WINDOW):
        text = f"tau={setting['tau']:g}, K={setting['k']}"
        if setting.get("window"):
            text = f"tau={setting['tau']:g}, {setting['k']} of {setting['window']}"
        return text + (f", min {setting['min_layer']}" if (setting.get("min_layer") or 1) > 1 else "")
    if row["family"] == V6:
        cut = ", ".join("-" if v is None else f"{v:.3g}" for v in setting["entropy_below"])
        return f"H < [{cut}] at {setting['checkpoints']}"
    if row["family"] == CALM:
        return f"p_max >= {setting['confidence_at_least']:g}, min {setting['min_layer']}"
    if row["family"] in (PROBE, V7_PROBE):
        return policy_from_setting(setting).describe()
    return ""


def _speedup(clock: dict | None) -> str:
    return f"{clock['speedup_vs_no_exit']:.2f}x" if clock else "-"


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _markdown_row(row: dict) -> str:
    name = TITLES.get(row["family"], row["family"])
    if "calibrated_default" in row:
        name = "**V7 calibrated default** (calibration file)"
    cal = row.get("calibration") or {}
    held = row.get("heldout") or {}
    runtime = row.get("heldout_runtime") or {}
    free = row.get("heldout_free_running") or {}
    clock = row.get("wallclock")
    cells = [
        name,
        row["readout"],
        "-" if row.get("target") is None else f"{row['target']:g}",
        _describe_setting(row),
        _fmt(cal.get("agreement")),
        _fmt(held.get("agreement")),
        _fmt(held.get("layers_saved"), percent=True),
        _fmt(runtime.get("agreement")),
        _fmt(runtime.get("layers_saved"), percent=True),
        _fmt(free.get("agreement")),
        _fmt(free.get("layers_saved"), percent=True),
        f"{clock['tokens_per_s']:.1f}" if clock else "-",
        _speedup(clock),
        _speedup(row.get(f"wallclock_batch{WALLCLOCK_BATCH}")),
    ]
    return "| " + " | ".join(cells) + " |"


def _joined(table: SweepTable, extra: SweepTable) -> SweepTable:
    """One table of ``table``'s families and ``extra``'s, on the same traces."""
    return SweepTable(
        table.num_layers,
        table.tokens,
        table.prompts,
        table.rows + extra.rows,
        {**table.exit_layers, **extra.exit_layers},
    )
