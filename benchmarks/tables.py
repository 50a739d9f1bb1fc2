"""Render every benchmark result (``benchmarks/results/*.json``) as Markdown tables: docs/benchmarks.md.

    python benchmarks/tables.py --out docs/benchmarks.md      # or: make docs
    python benchmarks/tables.py --check docs/benchmarks.md    # exit 1 if the file is not the rendering

The page is generated, never edited by hand, so the figures in it are the committed measurements.
Known files get their chosen columns; any other JSON is rendered whole (scalars, then each list of
records as a table), so a new benchmark shows up without changes here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# What each file is and how it was produced; files not listed get a generic heading.
ABOUT = {
    "engine_speed.json": "The single-process engine against HF `generate`, with and without exits "
    "(`benchmarks/engine_speed.py`, `make bench`): 8 chat prompts, 48 new tokens each with EOS ignored, "
    "median of interleaved rounds.",
    "pipeline_speed.json": "The 3-stage served pipeline against the in-process engine at the same "
    "concurrency (`benchmarks/pipeline_speed.py`): whole-answer HTTP requests, prefill included, EOS may end "
    "a request early. Memory per replica in MB (PSS adds up to what the app holds); stage compute and the "
    "CPU all of Ray used, in seconds, against the pipeline's wall time. One stream's TPOT ratio: each "
    "request's time per token, prefill included, over the engine's. `layouts` (`--layouts --rounds 2`): "
    "step groups in flight and torch threads per replica, each deployed in turn, exits off, each against "
    "an engine run just before it.",
    "speculative_speed.json": "Plain, early-exit and lossless speculative decoding, in the engine and "
    "in the served pipeline (`benchmarks/speculative_speed.py --rounds 3 --threads 1 --pipeline`). "
    "Agreement: share of positions equal to the same system's no-exit run.",
    "speculative_pipeline.json": "Lossless speculative decoding in the served 3-stage pipeline "
    "against the same pipeline with exits off, side by side in one run "
    "(`benchmarks/speculative_speed.py --pipeline-only`): held-out chat prompts over HTTP; the cost-model "
    "row drafts at full depth with the draft head at the last stage, gated by its confidence, and "
    "verifies with the full head after the reply. Time per token: compute per stage and in the LM head, "
    "from the replicas' counters; `needed`: the acceptance each draft depth would need for the target, "
    "from this run's costs, against what the model gives.",
    "speculative_sim.json": "The pipeline simulator against the measured CPU figures, then its GPU "
    "predictions (`python -m sedac_ray.sim --out ...`). GPU rows are assumptions, not measurements.",
    "serve_hops.json": "What a pipeline step's messages cost without a model (`benchmarks/serve_hops.py "
    "--rounds 3`): three chained no-op deployments with Serve's settings as shipped, the result "
    "unwinding back through the stages (shipped) or called straight to the waiting front door, then the "
    "same three hops as plain Ray actors and as a Ray Compiled Graph. Median ms per step, one stream.",
    "soak.json": "Mixed traffic against the served pipeline (`benchmarks/soak.py`, `make soak`).",
    "quality.json": "Quality against layers saved per exit policy (`sedac bench quality`).",
    "deferred_fill.json": "Exited tokens' deeper K/V by state propagation or by deferred fill (FREE: "
    "their deeper layers run in the next step beside the next token), same policies, held-out prompts, "
    "free-running (`benchmarks/deferred_fill.py --batches 1 8 --rounds 5`). 'saved (compute)' counts "
    "deferred layers as run, not saved; 'saved (read-out depth)' is the share of layers before each "
    "token is read out. Wall clock: exits off, propagation and deferred fill back to back, order rotated.",
}

# (column heading, field) per known list of records; a field may be a callable on the record.
Column = tuple[str, "str | Callable[[dict], object]"]
# pipeline_speed.json's rows and layouts: throughput against the engine, and where the run's time went.
PIPELINE_THROUGHPUT: list[Column] = [
    ("streams", "concurrency"),
    ("engine tok/s", "engine_tokens_per_s"),
    ("pipeline tok/s", "pipeline_tokens_per_s"),
    ("ratio", "throughput_ratio"),
]
PIPELINE_RUN: list[Column] = [
    ("stage batch rows", lambda r: per_stage(r.get("stage_mean_batch_rows"))),
    ("wall s", "pipeline_wall_s"),
    ("stage compute s", lambda r: per_stage(r.get("stage_compute_s"))),
    ("CPU s (all Ray)", lambda r: round(sum(r["cpu_s"].values()), 1) if "cpu_s" in r else None),
]
COLUMNS: dict[tuple[str, str], list[Column]] = {
    ("engine_speed.json", "rows"): [
        ("config", "config"),
        ("batch", "batch"),
        ("median s", "seconds_median"),
        ("tok/s", "tokens_per_s"),
        ("time vs HF", "time_vs_hf"),
        ("layers", "mean_layers"),
        ("ideal", "ideal_speedup"),
        ("achieved", "achieved_speedup"),
        ("ach/ideal", "achieved_over_ideal"),
        ("ideal(b)", "ideal_speedup_batch_aware"),
        ("ach/ideal(b)", "achieved_over_batch_aware_ideal"),
        ("step ms", "decode_step_ms"),
        ("dec. speedup", "achieved_decode_speedup"),
        ("dec/ideal", "decode_over_ideal"),
    ],
    ("pipeline_speed.json", "rows"): [
        ("policy", "policy"),
        *PIPELINE_THROUGHPUT,
        ("TPOT ms", "pipeline_tpot_ms"),
        ("engine TPOT ms", "engine_tpot_ms"),
        ("TPOT ratio", "tpot_ratio"),
        ("layers", "mean_layers"),
        ("same as engine", "identical_to_engine"),
        *PIPELINE_RUN,
    ],
    ("pipeline_speed.json", "layouts"): [
        ("layout", "layout"),
        ("round", "round"),
        *PIPELINE_THROUGHPUT,
        *PIPELINE_RUN,
    ],
    ("speculative_speed.json", "rows"): [
        ("system", "system"),
        ("mode", "mode"),
        ("policy", "policy"),
        ("batch", "batch"),
        ("tok/s", "tokens_per_s"),
        ("TPOT ms", "tpot_ms"),
        ("agree", "agreement"),
        ("layers", "mean_exit_layer"),
        ("accept", lambda r: (r.get("speculative") or {}).get("acceptance_rate")),
        ("drafts", lambda r: (r.get("speculative") or {}).get("drafts")),
        ("rolled back", lambda r: (r.get("speculative") or {}).get("rolled_back")),
        ("stage rows", lambda r: per_stage(r.get("stage_mean_batch_rows"))),
    ],
    ("speculative_pipeline.json", "rows"): [
        ("mode", "mode"),
        ("policy", "policy"),
        ("batch", "batch"),
        ("tok/s", "tokens_per_s"),
        ("vs no exit", "speedup_vs_no_exit"),
        ("TPOT ms", "tpot_ms"),
        ("agree", "agreement"),
        ("accept", lambda r: (r.get("speculative") or {}).get("acceptance_rate")),
        ("draft share", "draft_share"),
        ("rolled back", lambda r: (r.get("speculative") or {}).get("rolled_back")),
        ("stage rows", lambda r: per_stage(r.get("stage_mean_batch_rows"))),
        ("ms/token: stages", lambda r: per_stage(r["where_time_goes_ms_per_token"]["stage_compute_ms"])),
        ("head", lambda r: r["where_time_goes_ms_per_token"]["head_compute_ms"]),
        ("wall", lambda r: r["where_time_goes_ms_per_token"]["wall_ms"]),
        ("not compute", lambda r: r["where_time_goes_ms_per_token"]["not_compute_ms"]),
    ],
    ("deferred_fill.json", "quality"): [
        ("policy family", "family"),
        ("exited K/V", "kv"),
        ("setting", "policy"),
        ("tokens", "tokens"),
        ("agreement", "agreement"),
        ("saved (compute)", "layers_saved"),
        ("saved (read-out depth)", "exit_depth_saved"),
        ("deferred layers run", "deferred_layers"),
    ],
    ("deferred_fill.json", "wall_clock"): [
        ("policy family", "family"),
        ("batch", "batch"),
        ("tokens", "tokens"),
        ("rounds", "rounds"),
        ("off tok/s", "off_tok_s"),
        ("propagated tok/s", "propagated_tok_s"),
        ("deferred tok/s", "deferred_tok_s"),
        ("deferred / propagated", "deferred_vs_propagated"),
        ("deferred / off", "deferred_vs_off"),
        ("propagated / off", "propagated_vs_off"),
    ],
    ("speculative_sim.json", "figures"): [
        ("figure", "name"),
        ("measured", "measured"),
        ("simulated", "predicted"),
        ("error", lambda r: f"{r['error']:+.0%}"),
        ("role", "role"),
    ],
    ("speculative_sim.json", "predictions"): [
        ("scenario", "scenario"),
        ("streams", "concurrency"),
        ("acceptance", "acceptance"),
        ("ms/token none", lambda r: r["no_exit"]["tpot_ms"]),
        ("early", lambda r: r["early_exit"]["tpot_ms"]),
        ("spec", lambda r: r["speculative"]["tpot_ms"]),
        ("tokens/s none", lambda r: r["no_exit"]["tokens_per_s"]),
        ("early ", lambda r: r["early_exit"]["tokens_per_s"]),
        ("spec ", lambda r: r["speculative"]["tokens_per_s"]),
    ],
}
# Bulky per-token data that a table cannot show usefully.
SKIP = {"exit_layers", "seconds_all", "cost_probe", "fitted", "scenarios", "pareto"}


def per_stage(values: list[float] | None) -> str | None:
    """Mean rows per stage batch, stage by stage: ``6.9/6.1/4.4``."""
    return "/".join(f"{x:.1f}" for x in values) if values else None


def number(value: object) -> str:
    """Three significant figures or so, without exponents; integers and text as they are."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        size = abs(value)
        digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {number(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headings: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def records(file: str, key: str, items: list[dict]) -> list[str]:
    columns = COLUMNS.get((file, key))
    if columns is None:  # every field that some record has, in first-seen order
        names = list(dict.fromkeys(name for item in items for name in item if name not in SKIP))
        columns = [(name, name) for name in names]
    headings = [heading for heading, _ in columns]
    rows = [[field(item) if callable(field) else item.get(field) for _, field in columns] for item in items]
    return table(headings, rows)


def render_file(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    about = f"From `benchmarks/results/{path.name}`. {ABOUT.get(path.name, '')}".rstrip()
    lines = [f"## {path.stem}", "", about, ""]
    if path.name == "quality.json":  # the report's own Markdown (also written as quality.md)
        from sedac_ray.calibration.report import render_markdown

        return lines + render_markdown(data).rstrip("\n").splitlines() + [""]
    if not isinstance(data, dict):
        data = {"rows": data}
    scalars = {k: v for k, v in data.items() if k not in SKIP and not _is_records(v)}
    if scalars:
        lines += table(["setting", "value"], [[k, v] for k, v in scalars.items()])
    for key, value in data.items():
        if key not in SKIP and _is_records(value):
            lines += [f"`{key}`:", ""] + records(path.name, key, value)
    return lines


def _is_records(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def render(results: Path = RESULTS) -> str:
    files = sorted(results.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no benchmark results (*.json) in {results}")
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by benchmarks/tables.py from benchmarks/results/*.json (`make docs`); "
        "do not edit by hand. -->",
        "",
        "Every committed measurement, as the benchmark scripts wrote it. All were taken on a shared "
        "2-core CPU machine in fp32 unless a file says otherwise; single runs there are noisy. "
        "What they mean: [the README](../README.md#when-exits-pay-read-this-first), "
        "[performance](performance.md), [simulator](simulator.md), [calibration](calibration.md).",
        "",
    ]
    for path in files:
        lines += render_file(path)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of benchmark JSON files")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    target.add_argument("--check", type=Path, help="fail if this file is not the current rendering")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        if not args.check.is_file() or args.check.read_text() != text:
            print(f"{args.check} is not the rendering of {args.results}: run `make docs`", file=sys.stderr)
            return 1
        return 0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
