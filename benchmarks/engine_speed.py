"""Engine speed on the default model, side by side in one run (this machine is shared and noisy).

1. ``Engine`` with exits disabled against Hugging Face ``generate`` (greedy), at batch 1 and 8.
2. ``Engine`` with exits enabled against itself disabled, with the ideal speedup next to the
   achieved one. Ideal is ``L / mean layers`` per token; at batch > 1 a layer costs about the same
   for 1 row as for 8 (decode is memory-bound), so the batch-aware ideal ``L / mean over steps of
   the deepest token in the batch`` is printed too.

Every configuration generates exactly ``--new-tokens`` tokens per sequence (EOS ignored), and
rounds are interleaved so drift in machine load hits all configurations alike; medians are
reported. Prints a table and writes JSON.

    .venv/bin/python benchmarks/engine_speed.py [--rounds 3] [--new-tokens 48] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sedac_ray import Engine, ExitPolicy, load_model
from sedac_ray.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain how a refrigerator works.",
    "Give me three tips for learning to cook.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a bakery.",
]
POLICIES = {
    "tau=0.96,K=3": ExitPolicy(0.96, k=3),
    "tau=0.965,K=3": ExitPolicy(0.965, k=3),
    "tau=0.95,K=3,min18": ExitPolicy(0.95, k=3, min_layer=18),
    "tau=0.97,K=3": ExitPolicy(0.97, k=3),
}
# Every token exits right after layer m: decode-step cost = fixed + m * layer + (L - m) * fill.
FORCED = {m: ExitPolicy(1e-6, k=1, min_layer=m) for m in (10, 20)}


def hf_generate(model, prompt_ids: list[list[int]], new_tokens: int, pad_id: int) -> None:
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids])  # left padding
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    model.generate(
        input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/engine_speed.json")
    args = parser.parse_args()

    loaded = load_model()
    engine = Engine(loaded, ExitPolicy.disabled())
    num_layers = engine.num_layers
    prompt_ids = [engine.encode(p, chat=True) for p in PROMPTS]
    batches = {1: prompt_ids[:1], 8: prompt_ids}
    pad_id = int(loaded.tokenizer.pad_token_id or 0)

    def run_engine(policy: ExitPolicy, batch: list[list[int]]):
        return engine.generate_ids(
            batch, args.new_tokens, SamplingParams(), stop=[], policy=policy, ignore_eos=True
        )

    def prefill_only(batch: list[list[int]]):
        engine.generate_ids(
            batch, 1, SamplingParams(), stop=[], policy=ExitPolicy.disabled(), ignore_eos=True
        )

    configs = {}
    for size, batch in batches.items():
        configs[("HF generate", size)] = lambda b=batch: hf_generate(loaded.model, b, args.new_tokens, pad_id)
        configs[("engine, prefill only", size)] = lambda b=batch: prefill_only(b)
        configs[("engine, no exit", size)] = lambda b=batch: run_engine(ExitPolicy.disabled(), b)
        for name, policy in POLICIES.items():
            configs[(f"engine, {name}", size)] = lambda b=batch, p=policy: run_engine(p, b)
    for layer, policy in FORCED.items():
        configs[(f"engine, forced exit@{layer}", 1)] = lambda p=policy: run_engine(p, batches[1])

    times: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    layer_stats: dict[tuple[str, int], dict] = {}
    for key, fn in configs.items():  # warm-up, and layer statistics from the engine runs
        out = fn()
        if isinstance(out, list):
            per_token = [layer for r in out for layer in r.exit_layers[1:]]
            steps = list(zip(*[r.exit_layers[1:] for r in out], strict=True))
            layer_stats[key] = {
                "mean_layers": statistics.fmean(per_token),
                "mean_deepest_in_batch": statistics.fmean(max(step) for step in steps),
            }
    for round_no in range(args.rounds):
        for key, fn in configs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)

    rows = []
    for (name, size), samples in times.items():
        median = statistics.median(samples)
        row = {
            "config": name,
            "batch": size,
            "seconds_median": median,
            "seconds_all": samples,
            "tokens_per_s": size * args.new_tokens / median if "prefill" not in name else None,
        }
        stats = layer_stats.get((name, size))
        if stats:
            row.update(stats)
        rows.append(row)
    by_key = {(r["config"], r["batch"]): r for r in rows}
    steps = args.new_tokens - 1
    for row in rows:
        size = row["batch"]
        hf, off = by_key[("HF generate", size)], by_key[("engine, no exit", size)]
        prefill = by_key[("engine, prefill only", size)]["seconds_median"]
        if "prefill" not in row["config"] and row["config"] != "HF generate":
            row["decode_step_ms"] = 1000 * (row["seconds_median"] - prefill) / steps
        if row["config"] == "engine, no exit":
            row["time_vs_hf"] = row["seconds_median"] / hf["seconds_median"]
        if row["config"].startswith("engine, tau"):
            # Ideal counts decode steps only: the first token comes from the full-depth prefill.
            row["ideal_speedup"] = num_layers / row["mean_layers"]
            row["achieved_decode_speedup"] = off["decode_step_ms"] / row["decode_step_ms"]
            row["decode_over_ideal"] = row["achieved_decode_speedup"] / row["ideal_speedup"]
            row["ideal_speedup_batch_aware"] = num_layers / row["mean_deepest_in_batch"]
            row["achieved_speedup"] = off["seconds_median"] / row["seconds_median"]
            row["achieved_over_ideal"] = row["achieved_speedup"] / row["ideal_speedup"]
            row["achieved_over_batch_aware_ideal"] = (
                row["achieved_speedup"] / row["ideal_speedup_batch_aware"]
            )

    columns = [  # (header, key, width and format)
        ("config", "config", "<26"),
        ("batch", "batch", ">6"),
        ("median s", "seconds_median", ">10.2f"),
        ("tok/s", "tokens_per_s", ">8.1f"),
        ("vs HF", "time_vs_hf", ">7.2f"),
        ("layers", "mean_layers", ">8.1f"),
        ("ideal", "ideal_speedup", ">7.2f"),
        ("achieved", "achieved_speedup", ">9.2f"),
        ("ach/ideal", "achieved_over_ideal", ">10.2f"),
        ("ideal(b)", "ideal_speedup_batch_aware", ">9.2f"),
        ("ach/ideal(b)", "achieved_over_batch_aware_ideal", ">13.2f"),
        ("step ms", "decode_step_ms", ">8.1f"),
        ("dec.speedup", "achieved_decode_speedup", ">12.2f"),
        ("dec/ideal", "decode_over_ideal", ">10.2f"),
    ]

    def cell(value, spec: str) -> str:
        width = spec[1:].split(".")[0].rstrip("f")
        return format(value, spec) if value is not None else format("-", f">{width}")

    header = "".join(format(name, spec[0] + spec[1:].split(".")[0].rstrip("f")) for name, _, spec in columns)
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        print("".join(cell(row.get(key), spec) for _, key, spec in columns))
    # Cost decomposition of one batch-1 decode step: the head is timed directly, the rest follows
    # from the forced exits: t(m) = head + m * layer + (L - m) * fill.
    full = by_key[("engine, no exit", 1)]["decode_step_ms"]
    forced = {m: by_key[(f"engine, forced exit@{m}", 1)]["decode_step_ms"] for m in FORCED}
    costs = decompose(full, forced, head_ms(engine), num_layers)
    head, layer, fill = costs["head_ms"], costs["layer_ms"], costs["fill_ms"]
    print(
        f"\nbatch-1 decode step {full:.1f} ms = head+sampling {head:.1f} ms + {num_layers} x {layer:.2f} ms"
    )
    print(f"K/V fill of an exited token: {fill:.2f} ms per deeper layer ({fill / layer:.0%} of a layer)")
    print(
        f"model check, exit@20: predicted {costs['predicted_exit20_ms']:.1f} ms, measured {forced[20]:.1f} ms"
    )
    report = {
        "model": loaded.name,
        "num_layers": num_layers,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "rows": rows,
        "batch1_step_costs_ms": costs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


def head_ms(engine: Engine, repeats: int = 50) -> float:
    """Median time of final norm + LM head + argmax for one token."""
    hidden = torch.randn(1, engine.adapter.hidden_size)
    samples = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            engine.adapter.logits(hidden).argmax(-1).tolist()
            samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def decompose(full: float, forced: dict[int, float], head: float, num_layers: int) -> dict:
    layer = (full - head) / num_layers
    exit_at = min(forced)
    fill = (forced[exit_at] - head - exit_at * layer) / (num_layers - exit_at)
    check = max(forced)
    return {
        "head_ms": head,
        "layer_ms": layer,
        "fill_ms": fill,
        "predicted_exit20_ms": head + check * layer + (num_layers - check) * fill,
    }


if __name__ == "__main__":
    main()
