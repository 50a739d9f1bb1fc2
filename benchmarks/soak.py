"""Soak test: a bounded run of mixed traffic against the served pipeline on a local Ray.

Clients loop until the time is up, each time picking one of: a normal HTTP completion, an HTTP
stream, a gRPC call, a gRPC stream cancelled after two tokens, or an invalid request (HTTP or
gRPC). Greedy full-depth answers are checked against the first answer for the same prompt, so a
request that got another request's tokens shows up as a mismatch. ``--kill-at`` SIGKILLs one of
Stage1's two replicas and ``--scale-down-at`` scales Stage1 from 2 replicas to 1, that many seconds
in: their sequences are replayed elsewhere, so no request may be lost. Reports counts by outcome,
latency percentiles, the replicas' memory (RSS) at the start and the end, and the KV still held
at the end. Prints a table, writes JSON.

    .venv/bin/python benchmarks/soak.py [--duration 120] [--clients 8] [--kill-at 30] [--scale-down-at 70]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psutil

from sedac_ray.client import SedacClient
from sedac_ray.model.loading import load_model
from sedac_ray.serve.generated import sedac_pb2
from sedac_ray.serve.local_cluster import LocalPipeline

PROMPTS = [f"Give me {n} words that rhyme with {w}." for n, w in [(3, "cat"), (4, "sun"), (5, "tree")]]
PROMPTS += ["What is the capital of Italy?", "Name two planets.", "Why do leaves fall?"]
INVALID_HTTP = [{"prompt": ""}, {"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "sedac": {"tau": 2}}]
# What each kind of request may answer without having been lost.
EXPECTED = {"invalid": {"400", "422", "INVALID_ARGUMENT"}, "grpc-cancelled": {"CANCELLED", "OK"}}
REFUSED = {"429", "RESOURCE_EXHAUSTED"}
KINDS = {"http": 0.3, "http-stream": 0.2, "grpc": 0.15, "grpc-cancelled": 0.15, "invalid": 0.2}


class Soak:
    def __init__(self, pipeline: LocalPipeline, max_tokens: int):
        self.pipeline = pipeline
        self.max_tokens = max_tokens
        self.grpc = SedacClient(pipeline.grpc_target, timeout_s=300)
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, code) -> count
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.first_answer: dict[str, list[int]] = {}
        self.mismatches = 0

    def post(self, body: dict, stream: bool = False) -> tuple[int, dict | None]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        request = urllib.request.Request(
            self.pipeline.http_url + path,
            data=json.dumps({**body, "stream": stream}).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, None
        if not stream:
            return 200, json.loads(text)
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        if any("error" in e for e in events):
            return next(e["error"]["code"] for e in events if "error" in e), None
        return 200, {"choices": [{"token_ids": [e["choices"][0]["token_id"] for e in events]}]}

    def check(self, prompt: str, token_ids: list[int]) -> None:
        with self.lock:
            expected = self.first_answer.setdefault(prompt, token_ids)
            self.mismatches += expected != token_ids

    def one(self, kind: str, rng: random.Random) -> str:
        prompt = rng.choice(PROMPTS)
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens}
        full_depth = {**chat, "sedac": {"disable_exit": True}}
        if kind in ("http", "http-stream"):
            code, body = self.post(full_depth, stream=kind == "http-stream")
            if body is not None:
                self.check(prompt, body["choices"][0]["token_ids"])
            return str(code)
        if kind == "grpc":
            try:
                reply = self.grpc.generate(prompt, chat=True, max_tokens=self.max_tokens, disable_exit=True)
            except grpc.RpcError as err:
                return err.code().name
            self.check(prompt, list(reply.token_ids))
            return "OK"
        if kind == "grpc-cancelled":
            request = SedacClient.request(prompt, chat=True, max_tokens=self.max_tokens)
            call = self.grpc.stub.GenerateStream(request, timeout=300)
            try:
                next(call), next(call)
            except (grpc.RpcError, StopIteration) as err:
                return err.code().name if isinstance(err, grpc.RpcError) else "OK"
            call.cancel()
            return "CANCELLED"
        if rng.random() < 0.5:
            code, _ = self.post(rng.choice(INVALID_HTTP))
            return str(code)
        try:
            self.grpc.stub.Generate(sedac_pb2.GenerateRequest(prompt="hi", exit=sedac_pb2.ExitConfig(k=0)))
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    def client(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            started = time.perf_counter()
            try:
                code = self.one(kind, rng)
            except Exception as err:  # anything unexpected is an outcome too
                code = f"exception:{type(err).__name__}"
            with self.lock:
                self.outcomes[(kind, code)] += 1
                if code in ("200", "OK"):
                    self.latency[kind].append(time.perf_counter() - started)


def disrupt(pipeline: LocalPipeline, app: dict, kill_at: float | None, scale_at: float | None) -> list:
    """SIGKILL a Stage1 replica at ``kill_at`` s and scale Stage1 to one replica at ``scale_at`` s."""
    started, events = time.monotonic(), []
    for at, action in sorted(
        (t, a) for t, a in ((kill_at, "kill"), (scale_at, "scale-down")) if t is not None
    ):
        time.sleep(max(0.0, started + at - time.monotonic()))
        if action == "kill":
            victim = pipeline.stats("Stage1")[0]
            os.kill(victim["pid"], signal.SIGKILL)
            events.append(
                {"at_s": round(time.monotonic() - started, 1), "event": f"SIGKILL Stage1 pid {victim['pid']}"}
            )
        else:
            pipeline.deploy(app, replicas={"Stage1": 1})
            events.append(
                {"at_s": round(time.monotonic() - started, 1), "event": "Stage1 scaled to 1 replica"}
            )
    return events


def replica_rss_mb() -> dict[str, float]:
    """Resident memory of each Serve replica process, by its process title."""
    found: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica") and process.info["memory_info"]:
            name = title.split()[0].removeprefix("ray::ServeReplica:")
            found[name] = found.get(name, 0.0) + process.info["memory_info"].rss / 2**20
    return found


def kv_held(pipeline: LocalPipeline) -> list[int]:
    return [r["sequences"] for s in ("Stage0", "Stage1", "Stage2") for r in pipeline.stats(s)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values or [float("nan")])[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--kill-at", type=float, help="SIGKILL a Stage1 replica this many seconds in")
    parser.add_argument("--scale-down-at", type=float, help="scale Stage1 from 2 replicas to 1 at this time")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()

    load_model()  # leaves the dequantized copy the replicas load
    app = {"stages": 3, "replica_cpus": 0.1, "max_concurrent_requests": 2 * args.clients}
    if args.kill_at is not None or args.scale_down_at is not None:
        app["stage_replicas"] = [1, 2, 1]
    pipeline = LocalPipeline.start(app, num_cpus=args.num_cpus)
    soak = Soak(pipeline, args.max_tokens)
    soak.one("http", random.Random(0))  # warm up
    memory_start = replica_rss_mb()
    print(f"soaking for {args.duration:g} s with {args.clients} clients ...", flush=True)
    deadline = time.monotonic() + args.duration
    threads = [threading.Thread(target=soak.client, args=(i, deadline)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    events = disrupt(pipeline, app, args.kill_at, args.scale_down_at)
    for thread in threads:
        thread.join()
    settle = time.monotonic() + 30
    while any(kv_held(pipeline)) and time.monotonic() < settle:
        time.sleep(0.5)
    held = kv_held(pipeline)
    memory_end = replica_rss_mb()
    soak.grpc.close()
    pipeline.stop()

    total = sum(soak.outcomes.values())
    unexpected = {
        f"{kind} {code}": n
        for (kind, code), n in soak.outcomes.items()
        if code not in EXPECTED.get(kind, {"200", "OK"})
    }
    # A refusal before admission (429 / RESOURCE_EXHAUSTED, with a retry hint) loses no work; any
    # other unexpected answer is a lost request.
    refused = {k: n for k, n in unexpected.items() if k.split()[-1] in REFUSED}
    lost = {k: n for k, n in unexpected.items() if k not in refused}
    latencies = [x for values in soak.latency.values() for x in values]
    report = {
        "duration_s": args.duration,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "requests": total,
        "outcomes": {f"{kind} {code}": n for (kind, code), n in sorted(soak.outcomes.items())},
        "disruptions": events,
        "lost_requests": sum(lost.values()),
        "lost_by_outcome": lost,
        "refused_requests": sum(refused.values()),
        "mismatched_answers": soak.mismatches,
        "latency_s": {
            kind: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
            for kind, v in sorted(soak.latency.items())
        },
        "latency_all_ok_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
        "replica_rss_mb_start": memory_start,
        "replica_rss_mb_end": memory_end,
        "rss_drift_mb": sum(memory_end.values()) - sum(memory_start.values()),
        "sequences_holding_kv_at_end": sum(held),
    }
    print(f"\n{'outcome':<28}{'count':>8}\n" + "-" * 36)
    for name, count in report["outcomes"].items():
        print(f"{name:<28}{count:>8}")
    print(f"\n{'kind':<16}{'ok':>6}{'p50 s':>9}{'p99 s':>9}\n" + "-" * 40)
    for kind, row in report["latency_s"].items():
        print(f"{kind:<16}{row['n']:>6}{row['p50']:>9.2f}{row['p99']:>9.2f}")
    print(
        f"\nrequests {total}, lost {sum(lost.values())}, refused {sum(refused.values())} (429, retry later), "
        f"mismatched answers {soak.mismatches}, p99 (all ok) "
        f"{report['latency_all_ok_s']['p99']:.2f} s, replica RSS {sum(memory_start.values()):.0f} MiB -> "
        f"{sum(memory_end.values()):.0f} MiB (drift {report['rss_drift_mb']:+.0f} MiB), "
        f"sequences still holding KV: {sum(held)}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
