"""Speculative mode against plain early exit and full depth, side by side in one run.

For each batch size (1 and 8 chat prompts) the engine runs: no exit; plain early exit with a
policy; and speculative mode with the same policy (lossless: exited tokens are drafts, verified at
full depth). Two policies: one that exits often (its early drafts are mostly wrong on SmolLM2) and
one that exits late (drafts right more often, less to skip). Every configuration generates exactly
``--new-tokens`` tokens per sequence (EOS ignored); rounds are interleaved and medians reported.

Columns: tokens/s over the batch; time per output token (a sequence's latency / its tokens);
agreement with full depth (fraction of positions whose token equals the no-exit run's; it must be
1.0 for speculative); mean exit layer of the emitted tokens; and for speculative the acceptance
rate and tokens per verification.

A cost probe times one decoder layer and the LM head at 1..8 rows with 1 and 2 torch threads, and
the K/V fill of exited tokens: the per-layer costs the pipeline simulator is calibrated with.

With ``--pipeline`` the same modes also run through the 3-stage Ray Serve pipeline on a local
Ray (2 CPUs), as concurrent HTTP requests (rows with ``system: "pipeline"``). EOS ends those
requests (the API has no ignore-EOS switch), so their throughput counts the tokens produced, and
agreement is against the pipeline's own no-exit run (itself equal to HF greedy, see the tests).

Prints a table, writes JSON and a plot.

    .venv/bin/python benchmarks/speculative_speed.py [--rounds 3] [--new-tokens 48] [--pipeline] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from engine_speed import PROMPTS  # the same prompts as the other benchmarks
from pipeline_speed import PIPELINE_ARGS, counts_between, mean_batch_rows, stage_counts  # same app

from sedac_ray import Engine, ExitPolicy, load_model
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams
from sedac_ray.speculative import SpeculativeStats

POLICIES = {
    "tau=0.97,K=3": ExitPolicy(0.97, k=3),
    "tau=0.95,K=3,min27": ExitPolicy(0.95, k=3, min_layer=27),
}
DRAFT_LIMIT = 4


@dataclass(frozen=True)
class Config:
    mode: str  # "no exit", "early exit", "speculative", or "prefill" (one token: the prefill's cost)
    policy_name: str
    batch: int

    @property
    def label(self) -> str:
        return self.mode if self.mode == "no exit" else f"{self.mode}, {self.policy_name}"


def configs(batches: list[int]) -> list[Config]:
    out = []
    for batch in batches:
        out += [Config("prefill", "-", batch), Config("no exit", "-", batch)]
        for name in POLICIES:
            out += [Config("early exit", name, batch), Config("speculative", name, batch)]
    return out


def common_row(system: str, config: Config, seconds: list[float]) -> dict:
    """The keys every result row has, engine or pipeline."""
    return {
        "system": system,
        "mode": config.mode,
        "policy": config.policy_name,
        "batch": config.batch,
        "draft_limit": DRAFT_LIMIT if config.mode == "speculative" else None,
        "seconds_median": statistics.median(seconds),
        "seconds_all": seconds,
    }


def engine_rows(engine: Engine, prompt_ids: list[list[int]], args) -> list[dict]:
    def run(config: Config):
        policy = POLICIES.get(config.policy_name, ExitPolicy.disabled())
        return engine.generate_ids(
            prompt_ids[: config.batch],
            1 if config.mode == "prefill" else args.new_tokens,
            SamplingParams(),
            stop=[],
            policy=policy,
            ignore_eos=True,
            speculative=config.mode == "speculative",
        )

    todo = configs(args.batches)
    outputs = {config: run(config) for config in todo}  # warm-up; tokens and statistics
    times: dict[Config, list[float]] = {config: [] for config in todo}
    for round_no in range(args.rounds):
        for config in todo:
            start = time.perf_counter()
            run(config)
            times[config].append(time.perf_counter() - start)
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)

    rows = []
    for config in todo:
        if config.mode == "prefill":
            continue
        prefill = statistics.median(times[Config("prefill", "-", config.batch)])
        results = outputs[config]
        reference = outputs[Config("no exit", "-", config.batch)]
        same = [
            a == b
            for ours, theirs in zip(results, reference, strict=True)
            for a, b in zip(ours.token_ids, theirs.token_ids, strict=True)
        ]
        median = statistics.median(times[config])
        row = {
            **common_row("engine", config, times[config]),
            "tokens_per_s": config.batch * args.new_tokens / median,
            "tpot_ms": 1000 * median / args.new_tokens,
            "prefill_s": prefill,
            "decode_step_ms": 1000 * (median - prefill) / (args.new_tokens - 1),
            "agreement": sum(same) / len(same),
            "identical_sequences": sum(
                r.token_ids == t.token_ids for r, t in zip(results, reference, strict=True)
            ),
            "mean_exit_layer": statistics.fmean(x for r in results for x in r.exit_layers[1:]),
            "exit_layers": [r.exit_layers[1:] for r in results],
        }
        if config.mode == "speculative":
            stats = sum((r.speculative for r in results), SpeculativeStats())
            row["speculative"] = stats.as_dict()
        rows.append(row)
    return rows


def pipeline_rows(prompts: list[str], args) -> list[dict]:
    """The same modes through the served pipeline; rounds interleaved, medians reported."""
    from sedac_ray.serve.local_cluster import LocalPipeline

    pipeline = LocalPipeline.start(PIPELINE_ARGS, num_cpus=2)
    url = f"{pipeline.http_url}/v1/chat/completions"

    def call(prompt: str, config: Config) -> dict:
        sedac: dict = {"disable_exit": True}
        if config.mode != "no exit":
            policy = POLICIES[config.policy_name]
            sedac = {"tau": policy.tau, "k": policy.k, "min_layer": policy.min_layer}
            sedac["speculative"] = config.mode == "speculative"
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.new_tokens}
        request = urllib.request.Request(
            url,
            data=json.dumps({**body, "sedac": sedac}).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return {**answer, "latency_s": time.perf_counter() - start}

    def run(config: Config) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        with ThreadPoolExecutor(config.batch) as pool:
            answers = list(pool.map(lambda p: call(p, config), prompts[: config.batch]))
        return time.perf_counter() - start, answers

    todo = [c for c in configs(args.batches) if c.mode != "prefill"]
    run(todo[0])  # warm-up
    times: dict[Config, list[float]] = {config: [] for config in todo}
    answers: dict[Config, list[dict]] = {}
    stage_work: dict[Config, list[tuple[int, int]]] = {}  # (decode rows, batches) per stage, all rounds
    for round_no in range(args.pipeline_rounds):
        for config in todo:
            before = stage_counts(pipeline)
            seconds, answers[config] = run(config)
            after = stage_counts(pipeline)
            times[config].append(seconds)
            work = counts_between(before, after)
            so_far = stage_work.get(config, [(0, 0)] * len(work))
            stage_work[config] = [(r + r1, b + b1) for (r, b), (r1, b1) in zip(so_far, work, strict=True)]
        print(f"pipeline round {round_no + 1}/{args.pipeline_rounds} done", flush=True)
    pipeline.stop()

    rows = []
    for config in todo:
        mine = answers[config]
        reference = answers[Config("no exit", "-", config.batch)]
        same = [
            a == b
            for ours, theirs in zip(mine, reference, strict=True)
            for a, b in zip(ours["choices"][0]["token_ids"], theirs["choices"][0]["token_ids"], strict=False)
        ]
        tokens = sum(len(a["choices"][0]["token_ids"]) for a in mine)
        median = statistics.median(times[config])
        row = {
            **common_row("pipeline", config, times[config]),
            "tokens_per_s": tokens / median,
            "tpot_ms": statistics.median(
                1000 * a["latency_s"] / len(a["choices"][0]["token_ids"]) for a in mine
            ),
            "decode_step_ms": float("nan"),
            "agreement": sum(same) / len(same),
            "identical_sequences": sum(
                a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
                for a, b in zip(mine, reference, strict=True)
            ),
            "mean_exit_layer": statistics.fmean(x for a in mine for x in a["choices"][0]["exit_layers"][1:]),
            "exit_layers": [a["choices"][0]["exit_layers"][1:] for a in mine],
            "stage_mean_batch_rows": mean_batch_rows(stage_work[config]),
        }
        if config.mode == "speculative":
            counted = [f.name for f in fields(SpeculativeStats)]  # the response adds derived ratios
            stats = sum(
                (SpeculativeStats(**{n: a["usage"]["speculative"][n] for n in counted}) for a in mine),
                SpeculativeStats(),
            )
            row["speculative"] = stats.as_dict()
        rows.append(row)
    return rows


def cost_probe(engine: Engine, prompt_ids: list[list[int]], repeats: int) -> dict:
    """Median ms of one decoder layer (all 30 run, divided), the head, and a K/V fill, at 1..8 rows.
    Every measurement is taken once per round, rounds repeated: load drift hits all alike."""
    adapter = engine.adapter
    num_layers = engine.num_layers
    layers = LayerRange(adapter, 0, num_layers)
    ids = [p[:24] for p in prompt_ids]  # equal lengths: one right-padding-free prefill
    slots = torch.tensor(layers.cache.allocate(len(ids)))
    with torch.inference_mode():
        layers.prefill(slots, torch.arange(24).expand(len(ids), 24), adapter.embed_tokens(torch.tensor(ids)))

    def step(rows: int, policy: ExitPolicy):
        token_rows = TokenRows(
            ids=torch.arange(rows),
            slots=slots[:rows],
            positions=torch.full((rows,), 24),
            hidden=adapter.embed_tokens(torch.zeros(rows, dtype=torch.long)),
            rules=policy.rules(rows),
        )
        return lambda: layers.decode(token_rows)

    def head(rows: int):
        hidden = torch.randn(rows, adapter.hidden_size)
        return lambda: adapter.logits(hidden).argmax(-1).tolist()

    exit_at_2 = ExitPolicy(1e-6, k=1, min_layer=2)  # 2 layers, then fills in 28
    default_threads = torch.get_num_threads()
    with torch.inference_mode():
        work = {
            (threads, kind, rows): fn
            for threads in sorted({1, default_threads})
            for rows in (1, 2, 4, 8)
            for kind, fn in (
                ("full", step(rows, ExitPolicy.disabled())),
                ("forced", step(rows, exit_at_2)),
                ("head", head(rows)),
            )
        }
        samples: dict[tuple, list[float]] = {key: [] for key in work}
        for _ in range(repeats):
            for (threads, kind, rows), fn in work.items():
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn()
                samples[threads, kind, rows].append(1000 * (time.perf_counter() - start))
    torch.set_num_threads(default_threads)
    ms = {key: statistics.median(values) for key, values in samples.items()}
    probe: dict = {}
    for threads in sorted({1, default_threads}):
        layer = {rows: ms[threads, "full", rows] / num_layers for rows in (1, 2, 4, 8)}
        probe[f"threads_{threads}"] = {
            "layer_ms": layer,
            "head_ms": {rows: ms[threads, "head", rows] for rows in (1, 2, 4, 8)},
            "fill_ms": {
                rows: (ms[threads, "forced", rows] - 2 * layer[rows]) / (num_layers - 2)
                for rows in (1, 2, 4, 8)
            },
        }
    return probe


def print_table(rows: list[dict]) -> None:
    columns = [  # (header, width, cell)
        ("system", 8, lambda r: r["system"]),
        ("mode", 36, lambda r: r["mode"] if r["policy"] == "-" else f"{r['mode']}, {r['policy']}"),
        ("batch", 6, lambda r: r["batch"]),
        ("tok/s", 8, lambda r: f"{r['tokens_per_s']:.1f}"),
        ("TPOT ms", 9, lambda r: f"{r['tpot_ms']:.1f}"),
        ("step ms", 9, lambda r: f"{r['decode_step_ms']:.1f}"),
        ("agree", 7, lambda r: f"{r['agreement']:.2f}"),
        ("layers", 8, lambda r: f"{r['mean_exit_layer']:.1f}"),
        ("accept", 8, lambda r: f"{r['speculative']['acceptance_rate']:.2f}" if "speculative" in r else "-"),
        (
            "tok/verif",
            10,
            lambda r: f"{r['speculative']['tokens_per_verification']:.2f}" if "speculative" in r else "-",
        ),
        ("drafts", 8, lambda r: r["speculative"]["drafts"] if "speculative" in r else "-"),
        ("rolled back", 12, lambda r: r["speculative"]["rolled_back"] if "speculative" in r else "-"),
        ("stage rows", 17, lambda r: "/".join(f"{x:.1f}" for x in r.get("stage_mean_batch_rows", [])) or "-"),
    ]
    header = f"{columns[0][0]:<9}{columns[1][0]:<36}" + "".join(f"{h:>{w}}" for h, w, _ in columns[2:])
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        cells = [f"{columns[0][2](row):<9}", f"{columns[1][2](row):<36}"]
        cells += [f"{cell(row)!s:>{w}}" for _, w, cell in columns[2:]]
        print("".join(cells))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    systems = sorted({r["system"] for r in rows})
    fig, axes = plt.subplots(
        len(systems), len(batches), figsize=(7.5 * len(batches), 4 * len(systems)), squeeze=False
    )
    for ax, (system, batch) in zip(axes.flat, [(s, b) for s in systems for b in batches], strict=True):
        mine = [r for r in rows if r["batch"] == batch and r["system"] == system]
        labels = [r["mode"] if r["policy"] == "-" else f"{r['mode']}\n{r['policy']}" for r in mine]
        colors = [
            {"no exit": "grey", "early exit": "tab:blue", "speculative": "tab:green"}[r["mode"]] for r in mine
        ]
        ax.bar(range(len(mine)), [r["tokens_per_s"] for r in mine], color=colors)
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{system}, batch {batch} (agreement with full depth on each bar)")
        for i, r in enumerate(mine):
            ax.annotate(f"{r['agreement']:.2f}", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--probe-repeats", type=int, default=25)
    parser.add_argument("--pipeline", action="store_true", help="also run the modes through the pipeline")
    parser.add_argument("--pipeline-rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine"
    )
    parser.add_argument("--out", default="benchmarks/results/speculative_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model()
    engine = Engine(loaded, ExitPolicy.disabled(), draft_limit=DRAFT_LIMIT)
    prompt_ids = [engine.encode(p, chat=True) for p in PROMPTS]
    rows = engine_rows(engine, prompt_ids, args)
    if args.pipeline:
        rows += pipeline_rows(PROMPTS, args)
    probe = cost_probe(engine, prompt_ids, args.probe_repeats)
    print_table(rows)
    for name, entry in probe.items():
        cells = ", ".join(f"{rows_}: {ms:.2f}" for rows_, ms in entry["layer_ms"].items())
        print(
            f"{name}: layer ms by rows {{{cells}}}; head ms at 1 row {entry['head_ms'][1]:.1f}; "
            f"fill ms at 1 row {entry['fill_ms'][1]:.2f}"
        )
    report = {
        "model": loaded.name,
        "num_layers": engine.num_layers,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "draft_limit": DRAFT_LIMIT,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "cost_probe": probe,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
