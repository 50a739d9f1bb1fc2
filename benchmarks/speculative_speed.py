"""Speculative mode against plain early exit and full depth, side by side in one run.

For each batch size (1 and 8) the engine decodes held-out chat prompts (``heldout.jsonl``; batch
1 runs ``--batch1-prompts`` of them one at a time): no exit; plain early exit with a policy; and
speculative mode with the same policy (lossless: exited tokens are drafts, verified at full
depth), and speculative mode with the cost model's defaults (``Engine(model, speculative=True)``).
Every configuration generates exactly ``--new-tokens`` tokens per sequence (EOS ignored); rounds
are interleaved and medians reported.

**Speculation file.** Before the rows, the model's draft-head ranking and speculative defaults
are built when missing (or with ``--rebuild``): the calibration prompts' full-depth answers, one
HF forward over each (token counts plus summed probabilities rank the vocabulary; hidden states at
several depths give each draft's confidence and correctness, for every draft-head size and gate),
the cost probe below, and :func:`sedac_ray.cost_model.choose`. Written beside the model's
calibration file; the report also gives, per draft depth, the acceptance the model gives and the
acceptance the cost model says a 1.15x speed-up at batch 1 would need.

Columns: tokens/s over the batch; time per output token (a sequence's latency / its tokens);
agreement with full depth (fraction of positions whose token equals the no-exit run's; it must be
1.0 for speculative); mean exit layer of the emitted tokens; and for speculative the acceptance
rate and tokens per verification.

A cost probe times one decoder layer, the LM head and the draft heads at 1..32 rows with 1 and the
default number of torch threads, and the K/V fill of exited tokens: the per-layer costs the
pipeline simulator is calibrated with, and the cost model's input.

With ``--pipeline`` the same modes also run through the 3-stage Ray Serve pipeline on a local
Ray (2 CPUs), as concurrent HTTP requests (rows with ``system: "pipeline"``), on the same held-out
chat prompts (batch ``b``: ``max(b, --batch1-prompts)`` prompts, ``b`` at a time). The cost-model
row there is a speculative request at the speculation file's draft depth (full depth: exits off),
so every draft comes from the draft head at the last stage, gated by its confidence, and its
full-head verification runs in the LM-head deployment after the reply. EOS ends those requests
(the API has no ignore-EOS switch), so their throughput counts the tokens produced, and agreement
is against the pipeline's own no-exit run (itself equal to HF greedy, see the tests). Each
pipeline row also says where time goes: per token, each stage's decode compute and the LM head's,
from the replicas' own counters over the row's runs. ``--pipeline-only`` skips the engine rows
and the speculation file (it writes ``speculative_pipeline.json`` unless ``--out`` says otherwise).

Prints a table, writes JSON and a plot.

    .venv/bin/python benchmarks/speculative_speed.py [--rounds 3] [--new-tokens 48] [--pipeline] [--out PATH]
        [--rebuild] [--policies NAME ...] [--pipeline-only]
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
from pipeline_speed import PIPELINE_ARGS, counts_between, mean_batch_rows, stage_counts  # same app

from sedac_ray import Engine, ExitPolicy, cost_model, load_model
from sedac_ray.calibration.prompts import load_prompts
from sedac_ray.calibration.store import packaged_calibration_dir
from sedac_ray.draft_head import (
    DraftHead,
    SpeculationFile,
    SpeculationSettings,
    find_speculation,
    rank_tokens,
    speculation_file_name,
)
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams
from sedac_ray.speculative import SpeculativeStats

POLICIES = {
    "tau=0.97,K=3": ExitPolicy(0.97, k=3),
    "tau=0.95,K=3,min27": ExitPolicy(0.95, k=3, min_layer=27),
}
DRAFT_LIMIT = 4  # for the rows with a given policy; the cost-model row uses the chosen limit
COST_MODEL = "cost model"  # the policy name of the rows that run the engine's speculative defaults
DRAFT_SIZES = (2048, 4096, 8192, 16384)
GATES = (0.0, 0.2, 0.4, 0.6)
DRAFT_DEPTHS = (10, 15, 20, 25)  # and full depth
DRAFT_LIMITS = (2, 3, 4, 6, 8)
PROBE_ROWS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Config:
    mode: str  # "no exit", "early exit", "speculative", or "prefill" (one token: the prefill's cost)
    policy_name: str
    batch: int

    @property
    def label(self) -> str:
        return self.mode if self.mode == "no exit" else f"{self.mode}, {self.policy_name}"


def configs(batches: list[int], policies: list[str], cost_model_row: bool = True) -> list[Config]:
    out = []
    for batch in batches:
        out += [Config("prefill", "-", batch), Config("no exit", "-", batch)]
        for name in policies:
            out += [Config("early exit", name, batch), Config("speculative", name, batch)]
        if cost_model_row:
            out.append(Config("speculative", COST_MODEL, batch))
    return out


def common_row(system: str, config: Config, seconds: list[float]) -> dict:
    """The keys every result row has, engine or pipeline."""
    return {
        "system": system,
        "mode": config.mode,
        "policy": config.policy_name,
        "batch": config.batch,
        "draft_limit": (DRAFT_LIMIT if config.policy_name in POLICIES else None)
        if config.mode == "speculative"
        else None,
        "seconds_median": statistics.median(seconds),
        "seconds_all": seconds,
    }


def engine_rows(
    engine: Engine, speculative: Engine, prompt_ids: list[list[int]], args, costs: cost_model.MeasuredCosts
) -> list[dict]:
    """``engine`` runs the plain and given-policy rows, ``speculative`` (built with
    ``speculative=True`` and no policy) the cost-model rows. Batch ``b`` runs ``max(b,
    --batch1-prompts)`` prompts in groups of ``b``."""

    def groups(batch: int) -> list[list[list[int]]]:
        count = max(batch, args.batch1_prompts)
        return [prompt_ids[i : i + batch] for i in range(0, count, batch)]

    def run(config: Config):
        if config.policy_name == COST_MODEL:
            runner, policy = speculative, speculative.policy
        else:
            runner, policy = engine, POLICIES.get(config.policy_name, ExitPolicy.disabled())
        return [
            result
            for group in groups(config.batch)
            for result in runner.generate_ids(
                group,
                1 if config.mode == "prefill" else args.new_tokens,
                SamplingParams(),
                stop=[],
                policy=policy,
                ignore_eos=True,
                speculative=config.mode == "speculative",
            )
        ]

    todo = configs(args.batches, args.policies)
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
        runs = len(groups(config.batch))
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
            "sequences": len(results),
            "tokens_per_s": len(results) * args.new_tokens / median,
            "tpot_ms": 1000 * median / runs / args.new_tokens,
            "prefill_s": prefill,
            "decode_step_ms": 1000 * (median - prefill) / runs / (args.new_tokens - 1),
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
            row["draft_share"] = stats.drafts / max(stats.drafts + stats.direct, 1)
            if config.policy_name == COST_MODEL:
                row["draft_limit"] = speculative.draft_limit
                row["where_time_goes_ms_per_token"] = time_split(speculative, stats, costs, config.batch)
        rows.append(row)
    return rows


def time_split(engine: Engine, stats: SpeculativeStats, costs: cost_model.MeasuredCosts, batch: int) -> dict:
    """The cost model's prices applied to a row's actual counts: ms per token drafting (layers,
    fills, draft head), verifying (layers from the draft depth, full head), and in direct full-head
    read-outs; plus the same for plain decoding."""
    rule = engine.policy
    depth = rule.min_layer if rule.enabled and rule.min_layer else engine.num_layers
    plan = cost_model.Plan(depth, len(engine.draft_head), engine.draft_confidence, engine.draft_limit)
    counts = cost_model.ReplayCounts(
        tokens=stats.direct + stats.verified_tokens,
        draft_rows=stats.drafts,
        verified_rows=stats.drafts,
        verifications=stats.verifications,
        direct=stats.direct,
    )
    split = cost_model.breakdown(costs, plan, counts, batch)
    return {**{k: round(v, 2) for k, v in split.items()}, "plain_ms": round(costs.plain_ms(batch), 2)}


def pipeline_work(pipeline) -> dict:
    """Counters of every replica so far: per stage (decode rows, batches, compute seconds), the
    LM head's (rows, compute seconds), and the drafts the last stage made."""
    stages = [s for name in ("Stage0", "Stage1", "Stage2") for s in pipeline.stats(name)]
    (head,) = pipeline.stats("LMHead")
    return {
        "stage_compute_s": [s["decode_compute_s"] for s in stages],
        "head_compute_s": head["compute_s"],
        "head_rows": head["rows"],
        "drafted_at_last_stage": stages[-1]["drafted_here"],
    }


def work_between(before: dict, after: dict) -> dict:
    return {
        key: [b - a for a, b in zip(before[key], after[key], strict=True)]
        if isinstance(after[key], list)
        else after[key] - before[key]
        for key in after
    }


def where_time_goes(work: dict, tokens: int, wall_ms: float) -> dict:
    """Per decode token: each stage's decode compute, the LM head's, their sum, and the wall clock
    per output token of the whole run (``wall_ms``, prefill included); what the wall clock spends
    beyond the compute is hops, front door, proxy, prefill, and waiting for the 2 cores."""
    stages = [1000 * s / tokens for s in work["stage_compute_s"]]
    head = 1000 * work["head_compute_s"] / tokens
    return {
        "stage_compute_ms": [round(s, 2) for s in stages],
        "head_compute_ms": round(head, 2),
        "compute_ms": round(sum(stages) + head, 2),
        "wall_ms": round(wall_ms, 2),
        "not_compute_ms": round(wall_ms - sum(stages) - head, 2),
        "head_rows_per_token": round(work["head_rows"] / tokens, 3),
        "drafts_at_last_stage_per_token": round(work["drafted_at_last_stage"] / tokens, 3),
    }


def pipeline_rows(prompts: list[str], args, speculation: SpeculationFile | None) -> list[dict]:
    """The same modes through the served pipeline; rounds interleaved, medians reported. The
    cost-model row (when the model has a speculation file) drafts with the draft head."""
    from sedac_ray.serve.local_cluster import LocalPipeline

    pipeline = LocalPipeline.start(PIPELINE_ARGS, num_cpus=2)
    url = f"{pipeline.http_url}/v1/chat/completions"

    def call(prompt: str, config: Config) -> dict:
        sedac: dict = {"disable_exit": True}
        if config.policy_name == COST_MODEL:  # the speculation file's depth, as Engine(speculative=True)
            rule = speculation.settings.exit_policy
            sedac = {"speculative": True, **(rule or {"disable_exit": True})}
        elif config.mode != "no exit":
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
        """``max(batch, --batch1-prompts)`` prompts, ``batch`` at a time."""
        count = max(config.batch, args.batch1_prompts)
        start = time.perf_counter()
        answers = []
        with ThreadPoolExecutor(config.batch) as pool:
            for group in range(0, count, config.batch):
                chunk = prompts[group : group + config.batch]
                answers += list(pool.map(lambda p: call(p, config), chunk))
        return time.perf_counter() - start, answers

    todo = [
        c
        for c in configs(args.batches, args.policies, cost_model_row=speculation is not None)
        if c.mode != "prefill"
    ]
    for config in todo:  # warm-up, every mode once
        run(config)
    times: dict[Config, list[float]] = {config: [] for config in todo}
    answers: dict[Config, list[dict]] = {}
    stage_work: dict[Config, list[tuple[int, int]]] = {}  # (decode rows, batches) per stage, all rounds
    replica_work: dict[Config, list[dict]] = {}  # compute seconds and read-outs, per round
    tokens_made: dict[Config, int] = {}
    for round_no in range(args.pipeline_rounds):
        for config in todo:
            before, work_before = stage_counts(pipeline), pipeline_work(pipeline)
            seconds, answers[config] = run(config)
            after, work_after = stage_counts(pipeline), pipeline_work(pipeline)
            times[config].append(seconds)
            work = counts_between(before, after)
            so_far = stage_work.get(config, [(0, 0)] * len(work))
            stage_work[config] = [(r + r1, b + b1) for (r, b), (r1, b1) in zip(so_far, work, strict=True)]
            replica_work.setdefault(config, []).append(work_between(work_before, work_after))
            # Decode tokens (the first comes from prefill, whose compute the counters leave out).
            made = sum(len(a["choices"][0]["token_ids"]) - 1 for a in answers[config])
            tokens_made[config] = tokens_made.get(config, 0) + made
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
        row_tpot = statistics.median(1000 * a["latency_s"] / len(a["choices"][0]["token_ids"]) for a in mine)
        row = {
            **common_row("pipeline", config, times[config]),
            "sequences": len(mine),
            "tokens_per_s": tokens / median,
            "tpot_ms": row_tpot,
            "decode_step_ms": float("nan"),
            "agreement": sum(same) / len(same),
            "identical_sequences": sum(
                a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
                for a, b in zip(mine, reference, strict=True)
            ),
            "mean_exit_layer": statistics.fmean(x for a in mine for x in a["choices"][0]["exit_layers"][1:]),
            "exit_layers": [a["choices"][0]["exit_layers"][1:] for a in mine],
            "stage_mean_batch_rows": mean_batch_rows(stage_work[config]),
            "where_time_goes_ms_per_token": where_time_goes(
                summed(replica_work[config]), tokens_made[config], 1000 * median / tokens
            ),
        }
        if config.mode == "speculative":
            counted = [f.name for f in fields(SpeculativeStats)]  # the response adds derived ratios
            stats = sum(
                (SpeculativeStats(**{n: a["usage"]["speculative"][n] for n in counted}) for a in mine),
                SpeculativeStats(),
            )
            row["speculative"] = stats.as_dict()
            row["draft_share"] = round(stats.drafts / max(stats.drafts + stats.direct, 1), 4)
            row["draft_limit"] = PIPELINE_ARGS.get("draft_limit", 4)
        rows.append(row)
    for row in rows:  # against the same batch's no-exit row of this run
        plain = next(r for r in rows if r["batch"] == row["batch"] and r["mode"] == "no exit")
        row["speedup_vs_no_exit"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
    return rows


def summed(parts: list[dict]) -> dict:
    """Counters of several runs added up."""
    return {
        key: [sum(v) for v in zip(*(p[key] for p in parts), strict=True)]
        if isinstance(parts[0][key], list)
        else sum(p[key] for p in parts)
        for key in parts[0]
    }


def cost_probe(engine: Engine, prompt_ids: list[list[int]], repeats: int, ranked: list[int]) -> dict:
    """Median ms of one decoder layer (all 30 run, divided), the head, the draft heads (the top
    ``DRAFT_SIZES`` of ``ranked``) and a K/V fill, at ``PROBE_ROWS`` rows. Every measurement is
    taken once per round, rounds repeated: load drift hits all alike."""
    adapter = engine.adapter
    num_layers = engine.num_layers
    layers = LayerRange(adapter, 0, num_layers)
    width = max(PROBE_ROWS)
    ids = [prompt_ids[i % len(prompt_ids)][:24] for i in range(width)]  # equal lengths: no padding
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

    def draft_head(rows: int, size: int):
        hidden, subset = torch.randn(rows, adapter.hidden_size), DraftHead(adapter, ranked[:size])
        return lambda: subset.draft(hidden).tokens.tolist()

    exit_at_2 = ExitPolicy(1e-6, k=1, min_layer=2)  # 2 layers, then fills in 28
    default_threads = torch.get_num_threads()
    kinds = {"full": lambda r: step(r, ExitPolicy.disabled()), "forced": lambda r: step(r, exit_at_2)}
    kinds["head"] = head
    for size in DRAFT_SIZES:
        kinds[f"draft_{size}"] = lambda r, size=size: draft_head(r, size)
    with torch.inference_mode():
        work = {
            (threads, kind, rows): make(rows)
            for threads in sorted({1, default_threads})
            for rows in PROBE_ROWS
            for kind, make in kinds.items()
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
        layer = {rows: ms[threads, "full", rows] / num_layers for rows in PROBE_ROWS}
        probe[f"threads_{threads}"] = {
            "num_layers": num_layers,
            "layer_ms": layer,
            "head_ms": {rows: ms[threads, "head", rows] for rows in PROBE_ROWS},
            "fill_ms": {
                rows: (ms[threads, "forced", rows] - 2 * layer[rows]) / (num_layers - 2)
                for rows in PROBE_ROWS
            },
            "draft_head_ms": {
                size: {rows: ms[threads, f"draft_{size}", rows] for rows in PROBE_ROWS}
                for size in DRAFT_SIZES
            },
        }
    return probe


# ---- the speculation file: ranking, draft traces, the cost model's choice ----------------------


def calibration_answers(engine: Engine, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, full-depth greedy answer) for every calibration prompt (EOS ends an answer)."""
    prompt_ids = [engine.encode(item.prompt, item.chat) for item in load_prompts("calibration")]
    answers = []
    for start in range(0, len(prompt_ids), 8):
        results = engine.generate_ids(
            prompt_ids[start : start + 8], new_tokens, SamplingParams(), [], ExitPolicy.disabled()
        )
        answers += [(r.prompt_token_ids, r.token_ids) for r in results]
    return answers


@torch.inference_mode()
def hidden_traces(engine: Engine, answers, depths: list[int]):
    """One HF forward per answered prompt: its token scores (count + summed probability over every
    position), and the full-depth token after each answer position (teacher forced) with the raw
    hidden states that predict it at each depth (layer L's from a hook: HF's last hidden state is
    post-norm)."""
    model = engine.loaded.model
    vocab = engine.adapter.head.weight.shape[0]
    captured = {}
    hook = engine.adapter.layers[-1].register_forward_hook(lambda m, a, out: captured.update(last=out))
    scores, per_answer = [], []
    try:
        for prompt, answer in answers:
            ids = prompt + answer
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            logits = out.logits[0].float()
            counts = torch.bincount(torch.tensor(ids), minlength=vocab).double()
            scores.append(torch.softmax(logits, dim=-1).sum(0).double() + counts)
            last = (
                captured["last"][0] if isinstance(captured["last"], torch.Tensor) else captured["last"][0][0]
            )
            rows = slice(len(prompt), len(ids) - 1)  # inputs answer[0..n-2], predicting answer[1..]
            hidden = {d: (last if d == engine.num_layers else out.hidden_states[d][0])[rows] for d in depths}
            per_answer.append((logits[rows].argmax(-1), hidden))
    finally:
        hook.remove()
    return scores, per_answer


def draft_traces(engine: Engine, folds, depths: list[int]) -> list[cost_model.DraftTrace]:
    """Draft traces for every size, depth and gate; ``folds`` are (ranking, answers) pairs, each
    fold's answers drafted with its own ranking, sequences of all folds together."""
    traces = []
    for size in DRAFT_SIZES:
        readouts = {depth: [] for depth in depths}
        for ranked, per_answer in folds:
            head = DraftHead(engine.adapter, ranked[:size])
            for depth in depths:
                readouts[depth] += [(truth, head.draft(hidden[depth])) for truth, hidden in per_answer]
        for depth in depths:
            for gate in GATES:
                sequences = [
                    list(zip((r.confidence >= gate).tolist(), (r.tokens == truth).tolist(), strict=True))
                    for truth, r in readouts[depth]
                ]
                traces.append(cost_model.DraftTrace(depth, size, gate, sequences))
    return traces


def build_speculation(engine: Engine, probe_ids: list[list[int]], args) -> tuple[SpeculationFile, dict]:
    """Rank the vocabulary, record draft traces, measure costs, let the cost model choose; returns
    the file (not yet written) and the probe."""
    start = time.perf_counter()
    answers = calibration_answers(engine, args.build_new_tokens)
    depths = [*DRAFT_DEPTHS, engine.num_layers]
    scores, per_answer = hidden_traces(engine, answers, depths)
    eos = sorted(engine.eos_ids)
    ranked = rank_tokens(sum(scores), always=eos)
    # Acceptance out of sample: each half of the answers is drafted with the ranking built from
    # the other half (in sample, every answer token would be in the subset).
    halves = [range(0, len(answers), 2), range(1, len(answers), 2)]
    folds = [
        (rank_tokens(sum(scores) - sum(scores[i] for i in half), always=eos), [per_answer[i] for i in half])
        for half in halves
    ]
    traces = draft_traces(engine, folds, depths)
    probe = cost_probe(engine, probe_ids, args.probe_repeats, ranked)
    costs = cost_model.MeasuredCosts.from_dict(probe[f"threads_{torch.get_num_threads()}"])
    choice = cost_model.choose(costs, traces, DRAFT_LIMITS, widths=args.batches)
    plan = choice.plan
    rule = (
        None
        if plan.draft_depth == engine.num_layers
        else {"tau": 1e-6, "k": 1, "min_layer": plan.draft_depth}
    )
    settings = SpeculationSettings(plan.draft_tokens, plan.confidence, plan.draft_limit, rule)
    details = {
        "built_from": f"{len(answers)} calibration prompts, full-depth greedy answers of up to "
        f"{args.build_new_tokens} tokens; scores = count + summed probability; acceptance 2-fold "
        "out of sample (each half drafted with the other half's ranking)",
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "costs": probe[f"threads_{torch.get_num_threads()}"],
        "choice": cost_model_report(costs, traces, choice, args.batches),
    }
    return SpeculationFile(engine.loaded.name, ranked, settings, details), probe


def cost_model_report(costs, traces, choice: cost_model.Choice, widths: list[int]) -> dict:
    """The chosen plan with its predicted speed-ups; per width the best plan; per draft depth the
    acceptance the model gives (gate 0, chosen size; teacher forced, so an upper bound below full
    depth), what a 1.15x (batch 1) or 1.0x (batch 8) speed-up would need at the chosen size (best
    draft limit), and the speed-up if every draft were right."""
    plan = choice.plan
    predicted = {}
    for width in widths:
        mine = next(
            c for c in cost_model.evaluate(costs, traces, [plan.draft_limit], width) if c.plan == plan
        )
        best = cost_model.evaluate(costs, traces, DRAFT_LIMITS, width)[0]
        predicted[width] = {
            "speedup": round(mine.speedup, 3),
            "ms_per_token": round(mine.ms_per_token, 2),
            "plain_ms_per_token": round(mine.plain_ms_per_token, 2),
            "best_plan_at_this_width": {**best.plan.__dict__, "speedup": round(best.speedup, 3)},
        }
    depths = {}
    for trace in traces:
        if trace.draft_tokens != plan.draft_tokens or trace.confidence != 0.0:
            continue
        entry = {"acceptance_given": round(trace.acceptance, 4)}
        for width, target in ((1, 1.15), (8, 1.0)):
            if width not in widths:
                continue
            needed = [
                cost_model.required_acceptance(
                    costs, trace.draft_depth, plan.draft_tokens, limit, width, target
                )
                for limit in DRAFT_LIMITS
            ]
            ceiling = max(
                costs.plain_ms(width)
                / cost_model.fixed_chunk_ms(costs, trace.draft_depth, plan.draft_tokens, limit, 1.0, width)
                for limit in DRAFT_LIMITS
            )
            # The least acceptance over the draft limits (None: no limit reaches the target), and
            # the speed-up every draft being right would give (the best limit).
            entry[f"batch{width}_needed_for_x{target}"] = min(
                (a for a in needed if a is not None), default=None
            )
            entry[f"batch{width}_speedup_if_all_right"] = round(ceiling, 3)
        depths[trace.draft_depth] = entry
    chosen = next(
        t
        for t in traces
        if (t.draft_depth, t.draft_tokens, t.confidence)
        == (plan.draft_depth, plan.draft_tokens, plan.confidence)
    )
    return {
        "plan": plan.__dict__,
        "draft_share": round(chosen.share, 4),
        "acceptance_of_confident_drafts": round(chosen.acceptance, 4),
        "predicted": predicted,
        "by_draft_depth": depths,
    }


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


PIPELINE_TARGETS = {1: 1.1, 8: 1.0}  # the targets: speed-up over exits off, by batch


def pipeline_needed(rows: list[dict], speculation: SpeculationFile, stages: int = 3) -> list[dict]:
    """Per batch and draft depth, what speculative decoding would need in this pipeline to reach
    its target, from this run's measured costs (the no-exit row's time per token and compute per
    stage) and the acceptance the model gives at that depth (the speculation file: teacher
    forced, gate 0; the full-depth entry also has this run's, gated).

    A draft from the end of stage ``k`` (depth ``10k`` of 30; the LM head reads it out) lets the
    next step start that much sooner; at full depth (the draft head at the last stage) it saves the
    full head's time on the path. Batch 1 is latency-bound: a right draft saves that share of the
    time per token, a wrong one costs nothing extra at best (its void step overlaps), or a whole
    step at full depth (the wrong draft shows only with the next reply). Batch 8 is bound by the 2
    cores: a draft saves no work (its row still runs every layer), only, at full depth, the head
    calls that verifications share with the next batch, and a wrong draft costs a row through
    every stage. The acceptance needed assumes every token drafts (a lower bound: with fewer, it
    must be higher)."""
    details = speculation.details
    depths = details.get("choice", {}).get("by_draft_depth", {})
    draft_head = {
        int(k): v
        for k, v in details["costs"]["draft_head_ms"][str(len(speculation.draft_token_ids()))].items()
    }
    out = []
    for batch, target in PIPELINE_TARGETS.items():
        plain = next((r for r in rows if r["batch"] == batch and r["mode"] == "no exit"), None)
        ours = next((r for r in rows if r["batch"] == batch and r["policy"] == COST_MODEL), None)
        if plain is None:
            continue
        time_split = plain["where_time_goes_ms_per_token"]
        compute = time_split["stage_compute_ms"]
        per_token = time_split["wall_ms"]
        head = max(0.0, compute[-1] - statistics.fmean(compute[:-1]))  # the last stage's extra: its head
        drafting = draft_head.get(batch, draft_head[1]) / batch
        for stage in range(1, stages + 1):
            depth = round(stage * speculation_layers(details) / stages)
            full_depth = stage == stages
            if batch == 1:
                gain = (
                    head - drafting if full_depth else per_token * (1 - sum(compute[:stage]) / sum(compute))
                )
                loss = per_token if full_depth else 0.0
            else:
                # Verifications share the next batch's head call: about half the head per draft.
                gain = head / 2 - drafting if full_depth else -drafting
                loss = per_token
            needed = (per_token - per_token / target + loss) / (gain + loss) if gain + loss > 0 else None
            entry = {
                "batch": batch,
                "draft_depth": depth,
                "drafts_from": "last stage, draft head"
                if full_depth
                else f"end of stage {stage - 1}, LM head",
                "no_exit_ms_per_token": round(per_token, 2),
                "saved_if_right_ms": round(gain, 2),
                "lost_if_wrong_ms": round(loss, 2),
                "speedup_if_all_right": round(per_token / (per_token - gain), 3)
                if gain < per_token
                else None,
                "target": target,
                "acceptance_needed": round(needed, 3) if needed is not None and 0 <= needed <= 1 else None,
                "acceptance_given": depths.get(str(depth), {}).get("acceptance_given"),
            }
            if full_depth and ours is not None:
                entry["acceptance_measured"] = ours["speculative"]["acceptance_rate"]
                entry["draft_share_measured"] = ours["draft_share"]
                entry["speedup_measured"] = ours["speedup_vs_no_exit"]
            out.append(entry)
    return out


def simulated(rows: list[dict], speculation: SpeculationFile) -> dict:
    """The pipeline simulator's figures for this run's no-exit and draft-head rows (calibrated on
    the committed measurements, ``sedac_ray.sim``; the draft head's cost from the speculation
    file's probe; the measured draft share and acceptance), and the acceptance at which it
    predicts each batch's target, at the measured draft share and with every token drafted."""
    import dataclasses

    from sedac_ray.sim.calibration import Requests, benchmark_requests, calibrated_pipeline, fit, load
    from sedac_ray.sim.pipeline import simulate

    measured, served = load()
    model, _ = calibrated_pipeline(measured, served)
    size = str(len(speculation.draft_token_ids()))
    model = dataclasses.replace(model, draft_head=fit(speculation.details["costs"]["draft_head_ms"][size]))

    def tokens_per_s(lengths: list[int], batch: int, share: float, acceptance: float) -> float:
        """Requests ``batch`` at a time, as the benchmark sends them."""
        tokens = seconds = 0.0
        for start in range(0, len(lengths), batch):
            group = lengths[start : start + batch]
            requests = benchmark_requests(measured, group, model.costs.hop_ms, acceptance=acceptance)
            workload = dataclasses.replace(requests.workload, full_depth_drafts=share)
            mode = "speculative" if share > 0 else "no_exit"
            _, rate = Requests(workload, requests.prefill_trip_ms).measured_as_benchmarks_do(
                simulate(model, workload, mode)
            )
            group_tokens = sum(n + 1 for n in group)
            tokens, seconds = tokens + group_tokens, seconds + group_tokens / rate
        return tokens / seconds

    figures, needed = [], []
    for batch in sorted({r["batch"] for r in rows}):
        plain = next(r for r in rows if r["batch"] == batch and r["mode"] == "no exit")
        ours = next((r for r in rows if r["batch"] == batch and r["policy"] == COST_MODEL), None)
        lengths = [len(x) for x in plain["exit_layers"]]  # decode tokens of each request
        base = tokens_per_s(lengths, batch, 0.0, 1.0)
        figures.append(
            {
                "batch": batch,
                "mode": "no exit",
                "measured_tokens_per_s": round(plain["tokens_per_s"], 2),
                "simulated_tokens_per_s": round(base, 2),
            }
        )
        if ours is None:
            continue
        stats = ours["speculative"]
        acceptance = stats["accepted"] / stats["verifications"] if stats["verifications"] else 1.0
        rate = tokens_per_s(lengths, batch, ours["draft_share"], acceptance)
        figures.append(
            {
                "batch": batch,
                "mode": "speculative, draft head",
                "measured_tokens_per_s": round(ours["tokens_per_s"], 2),
                "simulated_tokens_per_s": round(rate, 2),
                "measured_speedup": ours["speedup_vs_no_exit"],
                "simulated_speedup": round(rate / base, 3),
            }
        )
        target = PIPELINE_TARGETS.get(batch, 1.0)
        for share in (ours["draft_share"], 1.0):
            low, high = 0.0, 1.0
            if tokens_per_s(lengths, batch, share, 1.0) / base < target:
                found = None  # not even with every draft right
            else:
                for _ in range(12):
                    middle = (low + high) / 2
                    low, high = (
                        (middle, high)
                        if tokens_per_s(lengths, batch, share, middle) / base < target
                        else (low, middle)
                    )
                found = round(high, 3)
            needed.append(
                {
                    "batch": batch,
                    "draft_depth": speculation_layers(speculation.details),
                    "draft_share": round(share, 4),
                    "target": target,
                    "simulated_speedup_if_all_right": round(
                        tokens_per_s(lengths, batch, share, 1.0) / base, 3
                    ),
                    "acceptance_needed": found,
                    "acceptance_measured": round(acceptance, 4),
                }
            )
    return {"figures": figures, "needed": needed}


def speculation_layers(details: dict) -> int:
    return int(details["costs"]["num_layers"])


def repo_path(path: Path | None) -> str:
    """A path inside this repository as it is named from the repository root."""
    root = Path(__file__).resolve().parents[1]
    path = Path(path or "").resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def pipeline_only(args) -> None:
    """The pipeline rows alone, against the packaged speculation file (built by a full run)."""
    from sedac_ray.exit.store import model_name_for_spec
    from sedac_ray.model.loading import DEFAULT_MODEL, load_config

    name = model_name_for_spec(DEFAULT_MODEL)  # what the app serves (PIPELINE_ARGS name no model)
    speculation = find_speculation(name)
    prompts = [item.prompt for item in load_prompts("heldout") if item.chat]
    rows = pipeline_rows(prompts, args, speculation)
    print_table(rows)
    for row in rows:
        print(f"{row['mode']}, {row['policy']}, batch {row['batch']}:", row["where_time_goes_ms_per_token"])
    report = {
        "model": name,
        "num_layers": load_config(DEFAULT_MODEL).num_hidden_layers,
        "new_tokens": args.new_tokens,
        "rounds": args.pipeline_rounds,
        "app": PIPELINE_ARGS,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "speculation_file": repo_path(speculation.path) if speculation else None,
        "speculation_settings": speculation.settings.__dict__ if speculation else None,
        "rows": rows,
        "needed": pipeline_needed(rows, speculation) if speculation else [],
    }
    if speculation:
        sim = simulated(rows, speculation)
        report["simulated"], report["simulated_needed"] = sim["figures"], sim["needed"]
    for entry in report["needed"] + report.get("simulated", []) + report.get("simulated_needed", []):
        print(entry)
    out = Path(args.out or "benchmarks/results/speculative_pipeline.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--probe-repeats", type=int, default=25)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one at a time at batch 1")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the speculation file")
    parser.add_argument("--build-new-tokens", type=int, default=48)
    parser.add_argument("--pipeline", action="store_true", help="also run the modes through the pipeline")
    parser.add_argument("--pipeline-rounds", type=int, default=2)
    parser.add_argument(
        "--pipeline-only", action="store_true", help="only the pipeline rows (no engine rows, no cost probe)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine"
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/results/speculative_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline_only:
        pipeline_only(args)
        return
    args.out = args.out or "benchmarks/results/speculative_speed.json"

    loaded = load_model()
    engine = Engine(loaded, ExitPolicy.disabled(), draft_limit=DRAFT_LIMIT)
    heldout = [item for item in load_prompts("heldout") if item.chat]
    prompt_ids = [engine.encode(item.prompt, chat=True) for item in heldout[: max(8, args.batch1_prompts)]]
    calibration_ids = [engine.encode(i.prompt, i.chat) for i in load_prompts("calibration") if i.chat][:8]
    speculation = None if args.rebuild else find_speculation(loaded.name)
    if speculation is None:
        speculation, probe = build_speculation(engine, calibration_ids, args)
        path = speculation.save(packaged_calibration_dir() / speculation_file_name(loaded.name))
        print(f"wrote {path}: {json.dumps(speculation.details['choice'], indent=1)}", flush=True)
        engine = Engine(loaded, ExitPolicy.disabled(), draft_limit=DRAFT_LIMIT)  # with its draft head
    else:
        probe = cost_probe(engine, calibration_ids, args.probe_repeats, speculation.ranked_token_ids)
    speculative = Engine(loaded, speculative=True)
    print(f"speculative defaults: {speculative.policy_source}; {speculation.settings}", flush=True)
    costs = cost_model.MeasuredCosts.from_dict(probe[f"threads_{torch.get_num_threads()}"])
    rows = engine_rows(engine, speculative, prompt_ids, args, costs)
    if args.pipeline:
        rows += pipeline_rows([item.prompt for item in heldout], args, speculation)
    print_table(rows)
    for name, entry in probe.items():
        cells = ", ".join(f"{rows_}: {ms:.2f}" for rows_, ms in entry["layer_ms"].items())
        print(
            f"{name}: layer ms by rows {{{cells}}}; head ms at 1 row {entry['head_ms'][1]:.1f}; "
            f"fill ms at 1 row {entry['fill_ms'][1]:.2f}; draft heads at 1 row "
            + ", ".join(f"{v}: {t[1]:.2f}" for v, t in entry["draft_head_ms"].items())
        )
    for row in rows:
        if "where_time_goes_ms_per_token" in row:
            print(f"batch {row['batch']} cost-model split (ms/token):", row["where_time_goes_ms_per_token"])
    report = {
        "model": loaded.name,
        "num_layers": engine.num_layers,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "draft_limit": DRAFT_LIMIT,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "load_average_after": os.getloadavg(),
        "speculation_file": repo_path(speculation.path),
        "speculation_settings": speculation.settings.__dict__,
        "cost_model": speculation.details.get("choice"),
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
