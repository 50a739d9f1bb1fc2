"""Prometheus series through Ray's metrics API (exported by each node's metrics agent with a
``ray_`` prefix; Serve adds deployment and replica tags).

Front door: requests and errors by protocol and code, prompt and generated tokens, the exit
layer of every generated token, layers executed against full depth (the saved fraction is
``1 - executed / full``, also kept as a gauge), request latency and requests in flight; for
speculative requests, drafts made, accepted and rolled back, and verifications.
Stages: rows per batch, queue depth, and KV use against the budget.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class FrontDoorMetrics:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.requests = Counter(
            "sedac_requests_total", "Requests answered, by protocol and status code", ("protocol", "code")
        )
        self.errors = Counter(
            "sedac_errors_total", "Requests that failed, by protocol and status code", ("protocol", "code")
        )
        self.prompt_tokens = Counter("sedac_prompt_tokens_total", "Prompt tokens of answered requests")
        self.generated_tokens = Counter("sedac_generated_tokens_total", "Generated tokens")
        self.exit_layer = Histogram(
            "sedac_exit_layer",
            "Decoder layers executed per generated token",
            boundaries=list(range(1, num_layers + 1)),
        )
        self.layers_executed = Counter("sedac_layers_executed_total", "Decoder layers run for tokens")
        self.layers_full_depth = Counter(
            "sedac_layers_full_depth_total", "Decoder layers those tokens would run at full depth"
        )
        self.layers_saved = Gauge(
            "sedac_layers_saved_fraction", "Fraction of decoder layers skipped by early exit, since start"
        )
        self.latency = Histogram(
            "sedac_request_latency_seconds", "Request latency, end to end", boundaries=_LATENCY_BUCKETS_S
        )
        self.in_flight = Gauge("sedac_requests_in_flight", "Requests being served by this front door")
        self.spec_counters = {
            name: Counter(f"sedac_speculative_{name}_total", help)
            for name, help in (
                ("drafts", "Tokens drafted by an early exit (speculative requests)"),
                ("accepted", "Drafts confirmed by full-depth verification"),
                ("rolled_back", "Drafts discarded: a wrong one and all drafted after it"),
                ("verifications", "Drafts verified at full depth"),
                ("rollbacks", "Verifications that found a wrong draft"),
            )
        }
        self._executed = 0
        self._full = 0

    def tokens(self, exit_layers: list[int]) -> None:
        for layer in exit_layers:
            self.exit_layer.observe(layer)
        if exit_layers:
            self.generated_tokens.inc(len(exit_layers))
            self.layers_executed.inc(sum(exit_layers))
            self.layers_full_depth.inc(self.num_layers * len(exit_layers))
            self._executed += sum(exit_layers)
            self._full += self.num_layers * len(exit_layers)
            self.layers_saved.set(1 - self._executed / self._full)

    def speculative(self, stats) -> None:
        """Count one speculative request's :class:`~sedac_ray.speculative.SpeculativeStats`."""
        for name, counter in self.spec_counters.items():
            if getattr(stats, name):
                counter.inc(getattr(stats, name))

    def answered(self, protocol: str, code: str, latency_s: float, prompt_tokens: int) -> None:
        self.requests.inc(tags={"protocol": protocol, "code": code})
        self.latency.observe(latency_s)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)

    def failed(self, protocol: str, code: str) -> None:
        self.errors.inc(tags={"protocol": protocol, "code": code})


class StageMetrics:
    def __init__(self, stage_index: int):
        self.tags = {"stage": str(stage_index)}
        self.batch_rows = Histogram(
            "sedac_stage_batch_rows", "Decode rows per stage batch", _BATCH_BUCKETS, tag_keys=("stage",)
        )
        self.queue_depth = Gauge(
            "sedac_stage_queue_depth", "Step requests waiting at a stage replica", tag_keys=("stage",)
        )
        self.kv_sequences = Gauge("sedac_kv_sequences", "Sequences holding KV", tag_keys=("stage",))
        self.kv_bytes = Gauge("sedac_kv_bytes", "KV cache bytes allocated", tag_keys=("stage",))
        self.kv_budget_used = Gauge(
            "sedac_kv_budget_used_fraction", "KV cache bytes over the budget", tag_keys=("stage",)
        )

    def batch(self, rows: int, queue_depth: int) -> None:
        if rows:
            self.batch_rows.observe(rows, tags=self.tags)
        self.queue_depth.set(queue_depth, tags=self.tags)

    def kv(self, sequences: int, nbytes: int, budget_bytes: int | None) -> None:
        self.kv_sequences.set(sequences, tags=self.tags)
        self.kv_bytes.set(nbytes, tags=self.tags)
        if budget_bytes:
            self.kv_budget_used.set(nbytes / budget_bytes, tags=self.tags)
