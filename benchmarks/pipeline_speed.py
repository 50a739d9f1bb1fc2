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
import json
import socket
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sedac_ray import Engine, ExitPolicy, load_model

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
POLICIES = {"no exit": {"disable_exit": True}, "tau=0.97,K=3": {"tau": 0.97, "k": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, prompt: str, max_tokens: int, sedac: dict) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "sedac": sedac}
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as response:
        answer = json.loads(response.read())
    answer["latency_s"] = time.perf_counter() - start
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/pipeline_speed.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from sedac_ray.serve.app import build_app

    loaded = load_model()  # also leaves the dequantized copy the replicas load
    engine = Engine(loaded)
    port = free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"stages": 3, "replica_cpus": 0.1}), name="sedac", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    request(url, "warm up", 4, {})

    rows = []
    for name, sedac in POLICIES.items():
        policy = (
            ExitPolicy.disabled() if sedac.get("disable_exit") else ExitPolicy(sedac["tau"], k=sedac["k"])
        )
        for concurrency in (1, 8):
            prompts = PROMPTS[:concurrency] if concurrency > 1 else PROMPTS[:2]
            start = time.perf_counter()
            if concurrency == 1:
                outs = [
                    engine.generate(p, max_new_tokens=args.max_tokens, chat=True, policy=policy)[0]
                    for p in prompts
                ]
            else:
                outs = engine.generate(prompts, max_new_tokens=args.max_tokens, chat=True, policy=policy)
            engine_s = time.perf_counter() - start
            engine_tokens = sum(len(r.token_ids) for r in outs)

            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                calls = [pool.submit(request, url, p, args.max_tokens, sedac) for p in prompts]
                answers = [c.result() for c in calls]
            pipeline_s = time.perf_counter() - start
            tokens = sum(a["usage"]["completion_tokens"] for a in answers)
            same = sum(
                a["choices"][0]["token_ids"] == r.token_ids for a, r in zip(answers, outs, strict=True)
            )
            rows.append(
                {
                    "policy": name,
                    "concurrency": concurrency,
                    "engine_tokens_per_s": engine_tokens / engine_s,
                    "pipeline_tokens_per_s": tokens / pipeline_s,
                    "pipeline_tpot_ms": statistics.median(
                        1000 * a["latency_s"] / a["usage"]["completion_tokens"] for a in answers
                    ),
                    "mean_layers": statistics.fmean(a["usage"]["mean_layers"] for a in answers),
                    "identical_to_engine": f"{same}/{len(answers)}",
                }
            )
            print(rows[-1], flush=True)
    serve.shutdown()
    ray.shutdown()

    names = ["policy", "conc", "engine tok/s", "pipeline tok/s", "TPOT ms", "layers", "same"]
    widths = [16, 5, 14, 16, 9, 8, 7]
    cells = [f"{n:>{w}}" for n, w in zip(names, widths, strict=True)]
    header = f"{names[0]:<{widths[0]}}" + "".join(cells[1:])
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['policy']:<16}{r['concurrency']:>5}{r['engine_tokens_per_s']:>14.1f}"
            f"{r['pipeline_tokens_per_s']:>16.1f}{r['pipeline_tpot_ms']:>9.1f}{r['mean_layers']:>8.1f}"
            f"{r['identical_to_engine']:>7}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"max_tokens": args.max_tokens, "num_cpus": args.num_cpus, "rows": rows}, indent=2)
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
