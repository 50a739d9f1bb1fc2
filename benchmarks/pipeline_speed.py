"""The Ray Serve pipeline against the single-process engine, side by side in one run.

Starts a local Ray (2 CPUs by default) with the 3-stage app, then for each policy (no exit, and
early exit) and each concurrency level sends the same chat prompts over HTTP and measures
end-to-end tokens/s and time per output token; the engine runs the same prompts in-process as
the baseline. EOS may end a request early, so throughput counts the tokens actually produced.
Prints a table, writes JSON.

    .venv/bin/python benchmarks/pipeline_speed.py [--max-tokens 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from engine_speed import PROMPTS  # the same prompts as the engine benchmark

from sedac_ray import Engine, ExitPolicy, load_model
from sedac_ray.serve.local_cluster import LocalPipeline

POLICIES = {"no exit": {"disable_exit": True}, "tau=0.97,K=3": {"tau": 0.97, "k": 3}}
# As deployments/local.yaml serves it on this 2-core machine (see that file): one step group,
# stages computing with one torch thread.
PIPELINE_ARGS = {"stages": 3, "replica_cpus": 0.1, "steps_in_flight": 1, "torch_threads": 1}
# What --layouts measures, side by side in the same run: step groups in flight and torch threads
# per replica.
LAYOUTS = {
    "1 group, 1 thread (shipped)": {"steps_in_flight": 1, "torch_threads": 1},
    "1 group, 2 threads": {"steps_in_flight": 1, "torch_threads": 2},
    "2 groups, 1 thread": {"steps_in_flight": 2, "torch_threads": 1},
    "2 groups, 2 threads": {"steps_in_flight": 2, "torch_threads": 2},
    "3 groups, 1 thread": {"steps_in_flight": 3, "torch_threads": 1},
}


def request(url: str, prompt: str, max_tokens: int, sedac: dict, stream: bool) -> dict:
    """One chat request (server-sent events with ``stream``); returns its tokens, exit layers and
    latency."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "sedac": sedac}
    body["stream"] = stream
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as response:
        text = response.read().decode()
    latency = time.perf_counter() - start
    if not stream:
        choice = json.loads(text)["choices"][0]
        return {"token_ids": choice["token_ids"], "exit_layers": choice["exit_layers"], "latency_s": latency}
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    choices = [c for e in events if e != "[DONE]" for c in json.loads(e)["choices"][:1] if "token_id" in c]
    return {
        "token_ids": [c["token_id"] for c in choices],
        "exit_layers": [c["exit_layer"] for c in choices],
        "latency_s": latency,
    }


def ray_processes() -> list[psutil.Process]:
    """The processes of this benchmark's own Ray (``ray.init`` started it, so they descend from
    this process), not those of another Ray on the machine."""
    return psutil.Process().children(recursive=True)


def replica_memory_mb() -> dict[str, dict[str, float]]:
    """Peak and current resident memory (MB) of each Serve replica of the app, and its
    proportional and unique set sizes, by deployment name, read from /proc (the replica's process
    title names its deployment)."""
    found: dict[str, dict[str, float]] = {}
    for proc in ray_processes():
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        match = re.search(r"ServeReplica:sedac:([A-Za-z0-9]+)", title)
        if match is None:
            continue
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = match.group(1)
        suffix = f"#{sum(k.startswith(name) for k in found)}" if name in found else ""
        try:
            full = proc.memory_full_info()
        except psutil.Error:
            continue
        found[name + suffix] = {
            "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024,
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            # RSS counts the shared libraries (torch, Ray) in every process that maps them; PSS
            # splits shared pages among their users, so PSS adds up to what the app holds.
            "pss_mb": full.pss / 2**20,
            "uss_mb": full.uss / 2**20,  # pages no other process shares
        }
    return dict(sorted(found.items()))


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of each Ray process on this machine, by role: each
    replica by deployment, the proxy, and the rest of Ray (controller, raylet, GCS, ...)."""
    found: dict[str, float] = {}
    for proc in ray_processes():
        try:
            title, times = " ".join(proc.cmdline()), proc.cpu_times()
        except psutil.Error:
            continue
        match = re.search(r"ServeReplica:sedac:([A-Za-z0-9]+)", title)
        role = match.group(1) if match else "ProxyActor" if "ProxyActor" in title else "Ray (other)"
        found[role] = found.get(role, 0.0) + times.user + times.system
    return found


def cpu_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in sorted(after)}


def stage_counts(pipeline: LocalPipeline) -> list[tuple[int, int, float]]:
    """(decode rows, decode batches, decode compute seconds) so far in each stage replica."""
    stats = [s for name in ("Stage0", "Stage1", "Stage2") for s in pipeline.stats(name)]
    return [(s["decode_rows"], s["decode_batches"], s["decode_compute_s"]) for s in stats]


def counts_between(before: list[tuple], after: list[tuple]) -> list[tuple[int, int, float]]:
    """(decode rows, decode batches, decode compute seconds) in each stage replica between two
    :func:`stage_counts`."""
    return [
        tuple(now - then for then, now in zip(old, new, strict=True))
        for old, new in zip(before, after, strict=True)
    ]


def mean_batch_rows(counts: list[tuple[int, int, float]]) -> list[float]:
    """Rows per decode batch in each stage replica."""
    return [round(rows / max(1, batches), 2) for rows, batches, _ in counts]


def measure(engine: Engine, url: str, pipeline: LocalPipeline, name: str, concurrency: int, args) -> dict:
    """The engine, then the pipeline, on the same prompts: one row of the table."""
    sedac = POLICIES[name]
    policy = ExitPolicy.disabled() if sedac.get("disable_exit") else ExitPolicy(sedac["tau"], k=sedac["k"])
    prompts = (PROMPTS * 4)[:concurrency] if concurrency > 1 else PROMPTS[:2]
    engine_tpot = []  # one stream: each request's time per token, prefill included, as for the pipeline
    start = time.perf_counter()
    if concurrency == 1:
        outs = []
        for p in prompts:
            began = time.perf_counter()
            outs.append(engine.generate(p, max_new_tokens=args.max_tokens, chat=True, policy=policy)[0])
            engine_tpot.append(1000 * (time.perf_counter() - began) / len(outs[-1].token_ids))
    else:
        outs = engine.generate(prompts, max_new_tokens=args.max_tokens, chat=True, policy=policy)
    engine_s = time.perf_counter() - start
    engine_tokens = sum(len(r.token_ids) for r in outs)

    before, cpu_before = stage_counts(pipeline), cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        calls = [pool.submit(request, url, p, args.max_tokens, sedac, args.stream) for p in prompts]
        answers = [c.result() for c in calls]
    pipeline_s = time.perf_counter() - start
    tokens = sum(len(a["token_ids"]) for a in answers)
    same = sum(a["token_ids"] == r.token_ids for a, r in zip(answers, outs, strict=True))
    after, cpu_after = stage_counts(pipeline), cpu_seconds()
    pipeline_tpot = statistics.median(1000 * a["latency_s"] / len(a["token_ids"]) for a in answers)
    engine_tpot_ms = statistics.median(engine_tpot) if engine_tpot else None
    counts = counts_between(before, after)
    return {
        "policy": name,
        "concurrency": concurrency,
        "engine_tokens_per_s": engine_tokens / engine_s,
        "pipeline_tokens_per_s": tokens / pipeline_s,
        "throughput_ratio": (tokens / pipeline_s) / (engine_tokens / engine_s),
        "pipeline_tpot_ms": pipeline_tpot,
        # one stream: the pipeline's time per token over the engine's, both per request
        "engine_tpot_ms": engine_tpot_ms,
        "tpot_ratio": pipeline_tpot / engine_tpot_ms if engine_tpot_ms else None,
        "mean_layers": statistics.fmean(x for a in answers for x in a["exit_layers"]),
        "identical_to_engine": f"{same}/{len(answers)}",
        # rows per decode batch in each stage, over this measurement only
        "stage_mean_batch_rows": mean_batch_rows(counts),
        # wall time of the stages' decode compute (layers, and the last stage's read-out),
        # against the CPU each stage's process used in all (cpu_s)
        "stage_compute_s": [round(c[2], 2) for c in counts],
        # where the machine's CPU went during the pipeline's run (the wall time is pipeline_s;
        # with 2 cores, at most 2 x that is available)
        "pipeline_wall_s": round(pipeline_s, 2),
        "cpu_s": cpu_between(cpu_before, cpu_after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", default="benchmarks/results/pipeline_speed.json")
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="environment for Ray and the replicas"
    )
    parser.add_argument("--app", default="{}", help="JSON overrides of the app args")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--stream", action="store_true", help="server-sent events (default: whole answers)")
    parser.add_argument(
        "--layouts",
        nargs="*",
        choices=list(LAYOUTS),
        help="first compare these step-group and thread layouts (all of LAYOUTS if none are named) "
        "at the top concurrency, exits off, --rounds times in turn",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the --layouts comparison")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    app_args = {**PIPELINE_ARGS, **json.loads(args.app)}

    loaded = load_model()  # also leaves the dequantized copy the replicas load
    engine = Engine(loaded)
    layouts = []
    pipeline = None
    chosen = [] if args.layouts is None else args.layouts or list(LAYOUTS)
    for round_index in range(args.rounds if chosen else 0):
        for layout in chosen:
            overrides = LAYOUTS[layout]
            if pipeline is None:
                pipeline = LocalPipeline.start({**app_args, **overrides}, num_cpus=args.num_cpus, env=env)
            else:
                pipeline.deploy({**app_args, **overrides})
            url = f"{pipeline.http_url}/v1/chat/completions"
            request(url, "warm up", 4, {}, args.stream)
            layouts.append(
                {
                    "layout": layout,
                    "round": round_index,
                    **measure(engine, url, pipeline, "no exit", max(args.concurrency), args),
                }
            )
            print(layouts[-1], flush=True)
    if pipeline is None:
        pipeline = LocalPipeline.start(app_args, num_cpus=args.num_cpus, env=env)
    else:
        pipeline.deploy(app_args)
    url = f"{pipeline.http_url}/v1/chat/completions"
    request(url, "warm up", 4, {}, args.stream)

    rows = []
    for name in args.policies:
        for concurrency in args.concurrency:
            rows.append(measure(engine, url, pipeline, name, concurrency, args))
            print(rows[-1], flush=True)
    # The engine's model maps the same safetensors pages as the stages; freed first, so that
    # PSS and USS count the app's weights in the app alone.
    del engine, loaded
    gc.collect()
    memory = replica_memory_mb()
    pipeline.stop()

    names = [
        "policy",
        "conc",
        "engine tok/s",
        "pipeline tok/s",
        "ratio",
        "TPOT ms",
        "TPOT x",
        "layers",
        "same",
    ]
    widths = [16, 5, 14, 16, 7, 9, 8, 8, 7]
    cells = [f"{n:>{w}}" for n, w in zip(names, widths, strict=True)]
    header = f"{names[0]:<{widths[0]}}" + "".join(cells[1:])
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['policy']:<16}{r['concurrency']:>5}{r['engine_tokens_per_s']:>14.1f}"
            f"{r['pipeline_tokens_per_s']:>16.1f}{r['throughput_ratio']:>7.2f}{r['pipeline_tpot_ms']:>9.1f}"
            + (f"{r['tpot_ratio']:>8.2f}" if r["tpot_ratio"] is not None else f"{'-':>8}")
            + f"{r['mean_layers']:>8.1f}"
            f"{r['identical_to_engine']:>7}"
        )
    for layout in dict.fromkeys(r["layout"] for r in layouts):
        ratios = [r["throughput_ratio"] for r in layouts if r["layout"] == layout]
        print(
            f"layout {layout:<20} {max(args.concurrency)} streams: median {statistics.median(ratios):.2f}x "
            f"the engine ({', '.join(f'{x:.2f}' for x in ratios)})"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "max_tokens": args.max_tokens,
                "num_cpus": args.num_cpus,
                "stream": args.stream,
                "app_args": app_args,
                "env": env,
                "rows": rows,
                "layouts": layouts,
                "replica_memory_mb": memory,
            },
            indent=2,
        )
    )
    for field in ("peak_rss_mb", "pss_mb", "uss_mb"):
        print(
            f"\n{field} per replica: "
            + ", ".join(f"{k} {v[field]:.0f}" for k, v in memory.items())
            + f"; app total {sum(v[field] for v in memory.values()):.0f}"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
