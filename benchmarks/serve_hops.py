"""What a pipeline step's messages cost in Ray Serve, without any model: three chained no-op
deployments (like Stage0 -> Stage1 -> Stage2), payloads the size of a step's hidden states.

Two ways for the last stage's result to reach the front door:

* ``unwind``: each stage awaits the next one's reply and returns it (the shipped design: 3 calls,
  3 replies, the replies travelling back through the stages);
* ``direct``: each stage forwards and returns at once, and the last stage *calls* the front door
  replica that is waiting (pinned, as sticky routing does): 4 calls, no reply on the way.

For what a lighter transport would give, the same three hops as plain Ray actors (no Serve):

* ``ray actors``: each actor awaits the next one's reply, like ``unwind``;
* ``compiled graph``: a Ray Compiled Graph over the three actors (shared-memory channels, the
  transport vLLM's Ray executor uses between pipeline ranks), driven from this process.

Same Serve settings as the app (``LOW_OVERHEAD_ENV``: gRPC between deployments, user code and
router on the replica's loop). One stream steps at a time; rounds alternate the modes.

    .venv/bin/python benchmarks/serve_hops.py [--steps 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve

from sedac_ray.serve.app import LOW_OVERHEAD_ENV, STICKY_ROUTER
from sedac_ray.serve.routing import pin

APP = "hops"
HIDDEN = 576  # SmolLM2-135M's hidden size
OPTIONS = {
    "max_ongoing_requests": 256,
    "request_router_config": STICKY_ROUTER,
    "ray_actor_options": {"num_cpus": 0},
}


@serve.deployment(**OPTIONS)
class Hop:
    def __init__(self, next_hop=None):
        self.next_hop = next_hop
        self.front = None

    async def unwind(self, hidden: np.ndarray) -> int:
        if self.next_hop is None:
            return hidden.shape[0]
        return await self.next_hop.unwind.remote(hidden + 1)

    async def direct(self, hidden: np.ndarray, key: int, front_replica: str) -> None:
        if self.next_hop is not None:
            self.next_hop.direct.remote(hidden + 1, key, front_replica)  # not awaited: no reply waits
            return
        if self.front is None:
            self.front = serve.get_deployment_handle("Front", APP)
        await self.front.options(session_id=pin(front_replica)).deliver.remote(key, hidden.shape[0])


@serve.deployment(**OPTIONS)
class Front:
    def __init__(self, first_hop):
        self.first_hop = first_hop
        self.waiting: dict[int, asyncio.Future] = {}
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def deliver(self, key: int, result: int) -> None:
        self.waiting.pop(key).set_result(result)

    async def steps(self, mode: str, rows: int, count: int) -> list[float]:
        """Seconds per step, ``count`` steps one after another."""
        hidden = np.random.rand(rows, HIDDEN).astype(np.float32)
        seconds = []
        for key in range(count):
            start = time.perf_counter()
            if mode == "unwind":
                await self.first_hop.unwind.remote(hidden)
            else:
                self.waiting[key] = asyncio.get_running_loop().create_future()
                self.first_hop.direct.remote(hidden, key, self.replica)
                await self.waiting[key]
            seconds.append(time.perf_counter() - start)
        return seconds


@ray.remote(num_cpus=0)
class PlainHop:
    def __init__(self, next_hop=None):
        self.next_hop = next_hop

    async def unwind(self, hidden: np.ndarray) -> int:
        if self.next_hop is None:
            return hidden.shape[0]
        return await self.next_hop.unwind.remote(hidden + 1)


@ray.remote(num_cpus=0)
class GraphHop:
    def forward(self, hidden: np.ndarray) -> np.ndarray:
        return hidden + 1


def plain_actor_steps(rows: int, count: int) -> dict[str, list[float]]:
    """Seconds per step over three plain actors: awaited calls, then a compiled graph."""
    from ray.dag import InputNode

    hidden = np.random.rand(rows, HIDDEN).astype(np.float32)
    chain = PlainHop.remote(PlainHop.remote(PlainHop.remote()))
    hops = [GraphHop.remote() for _ in range(3)]
    with InputNode() as step_input:
        graph = hops[2].forward.bind(hops[1].forward.bind(hops[0].forward.bind(step_input)))
    compiled = graph.experimental_compile()
    seconds: dict[str, list[float]] = {"ray actors": [], "compiled graph": []}
    for _ in range(count):
        start = time.perf_counter()
        ray.get(chain.unwind.remote(hidden))
        seconds["ray actors"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get(compiled.execute(hidden))
        seconds["compiled graph"].append(time.perf_counter() - start)
    compiled.teardown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serve_hops.json")
    args = parser.parse_args()

    ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": LOW_OVERHEAD_ENV}, include_dashboard=False)
    stage2 = Hop.options(name="Stage2").bind()
    stage1 = Hop.options(name="Stage1").bind(stage2)
    stage0 = Hop.options(name="Stage0").bind(stage1)
    front = serve.run(Front.bind(stage0), name=APP, route_prefix=None)
    medians: dict[tuple[str, int], list[float]] = {}
    warm = args.steps // 10
    for rows in (1, 16):
        for _ in range(args.rounds):
            for mode in ("unwind", "direct"):
                seconds = front.steps.remote(mode, rows, args.steps).result()[warm:]
                medians.setdefault((mode, rows), []).append(1000 * statistics.median(seconds))
                print(
                    f"{mode:>7} {rows:>3} rows: median {medians[mode, rows][-1]:.2f} ms per step", flush=True
                )
    serve.shutdown()
    for rows in (1, 16):
        for _ in range(args.rounds):
            for mode, seconds in plain_actor_steps(rows, args.steps).items():
                medians.setdefault((mode, rows), []).append(1000 * statistics.median(seconds[warm:]))
                print(
                    f"{mode:>7} {rows:>3} rows: median {medians[mode, rows][-1]:.2f} ms per step", flush=True
                )
    ray.shutdown()

    results = [
        {
            "mode": mode,
            "rows": rows,
            "transport": "Ray actors" if mode in ("ray actors", "compiled graph") else "Serve handles",
            "step_ms_median_of_rounds": statistics.median(values),
            "step_ms_rounds": [round(v, 2) for v in values],
        }
        for (mode, rows), values in medians.items()
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "rounds": args.rounds,
                "num_cpus": args.num_cpus,
                "env": LOW_OVERHEAD_ENV,
                "rows": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
