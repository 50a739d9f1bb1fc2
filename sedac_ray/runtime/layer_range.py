"""One contiguous range of decoder layers, run with token-group separation.

This is where a token exits. :meth:`LayerRange.decode` runs layers ``start..end-1`` for a group of
decode tokens. After each layer it applies the exit policy; tokens that exit leave the working
group by index-select (never by masking), so the next layer only computes the tokens that
continue. Tokens that exited keep getting K/V in every deeper layer of the range by state
propagation: the layer projects K/V from the exited hidden state and stops right after storing
them, without attention or MLP (DESIGN §4). Or, with deferred fill (FREE, Bae et al. 2023), they
get none now and run their deeper layers at full computation in the next step's layer calls, beside
the next token (``decode(..., deferred=...)``), so every later token attends to exact K/V.

The single-process engine runs one range over the whole model; a pipeline stage runs one range
over its slice of layers with exactly this code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sedac_ray.exit.probes import ExitProbes
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import RULE_WIDTH, decide, rules_use_probe, stability
from sedac_ray.runtime.kv_cache import CacheView, SlotKVCache


@dataclass
class TokenRows:
    """Decode tokens travelling together, one per row. Bookkeeping tensors live on the CPU."""

    ids: torch.Tensor  # [n] the caller's id of each row (batch index, request id, ...)
    slots: torch.Tensor  # [n] KV cache slot of the row's sequence
    positions: torch.Tensor  # [n] position of the row's token in its sequence
    hidden: torch.Tensor  # [n, hidden_size] on the model's device
    rules: torch.Tensor  # [n, RULE_WIDTH] each row's exit policy (ExitPolicy.rules)
    state: torch.Tensor | None = None  # [n] exit-policy state; zeros when a token starts decoding
    exit_layer: torch.Tensor | None = None  # [n] layers executed, set once a row exits

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = torch.zeros(len(self.ids), dtype=torch.long)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index: torch.Tensor) -> TokenRows:
        device_index = index.to(self.hidden.device)
        return TokenRows(
            ids=self.ids[index],
            slots=self.slots[index],
            positions=self.positions[index],
            hidden=self.hidden[device_index],
            rules=self.rules[index],
            state=self.state[index],
            exit_layer=None if self.exit_layer is None else self.exit_layer[index],
        )

    @staticmethod
    def concat(parts: list[TokenRows]) -> TokenRows:
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        exit_layers = [p.exit_layer for p in parts]
        return TokenRows(
            ids=torch.cat([p.ids for p in parts]),
            slots=torch.cat([p.slots for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
            hidden=torch.cat([p.hidden for p in parts]),
            rules=torch.cat([p.rules for p in parts]),
            state=torch.cat([p.state for p in parts]),
            exit_layer=None if any(e is None for e in exit_layers) else torch.cat(exit_layers),
        )

    @staticmethod
    def empty(hidden_size: int, device, dtype) -> TokenRows:
        none = torch.zeros(0, dtype=torch.long)
        hidden = torch.zeros(0, hidden_size, device=device, dtype=dtype)
        return TokenRows(none, none, none, hidden, torch.zeros(0, RULE_WIDTH), none, none)


@dataclass
class RangeOutput:
    exited: TokenRows  # rows that exited in this range (all remaining rows if it ends the model)
    continuing: TokenRows  # rows the next range must compute
    fill: TokenRows  # exited rows (this range's and earlier) whose K/V deeper ranges still need
    deferred: TokenRows | None = None  # the call's deferred rows, hidden = output of the range's end


def attention_mask(
    positions: torch.Tensor, key_length: int, window: int | None, dtype: torch.dtype, implicit_causal: bool
) -> torch.Tensor | None:
    """Additive mask ``[rows, 1, tokens, key_length]``: a query at position ``p`` sees keys
    ``j <= p`` (and ``p - j < window`` on sliding-window layers). ``None`` where attending to
    every returned key is already right, as Hugging Face itself passes it."""
    rows, tokens = positions.shape
    same_rows = rows == 1 or bool((positions == positions[:1]).all())
    window_free = window is None or window >= key_length
    if same_rows and window_free and int(positions[0, -1]) == key_length - 1:
        if tokens == 1 or (implicit_causal and tokens == key_length):
            return None
    keys = torch.arange(key_length)
    query = positions.unsqueeze(-1)
    visible = keys <= query
    if window is not None:
        visible &= query - keys < window
    mask = torch.zeros(rows, 1, tokens, key_length, dtype=dtype)
    return mask.masked_fill_(~visible.unsqueeze(1), torch.finfo(dtype).min)


class _CallContext:
    """Everything a layer call needs for one group of rows: positions, rotary, masks, cache view."""

    def __init__(self, adapter: ModelAdapter, cache: SlotKVCache, slots, positions, hidden, fill_only=False):
        self.adapter = adapter
        self.positions = positions  # [rows, tokens], CPU
        self.position_ids = positions.to(adapter.device)
        self.view: CacheView = cache.view(slots.tolist(), positions, fill_only=fill_only)
        self.rotary = adapter.position_embeddings(hidden, self.position_ids)
        self.masks: dict[int | None, torch.Tensor | None] = {}
        if not fill_only:
            for window in set(adapter.sliding_windows):
                self.masks[window] = attention_mask(
                    positions, self.view.key_length, window, adapter.dtype, adapter.implicit_causal
                )
                if self.masks[window] is not None:
                    self.masks[window] = self.masks[window].to(adapter.device)

    def run(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter
        return adapter.run_layer(
            index,
            hidden,
            self.position_ids,
            self.rotary[adapter.layer_types[index]],
            self.masks[adapter.sliding_windows[index]],
            self.view,
        )

    def fill(self, index: int, hidden: torch.Tensor) -> None:
        adapter = self.adapter
        adapter.fill_layer_kv(
            index, hidden, self.position_ids, self.rotary[adapter.layer_types[index]], self.view
        )


class LayerRange:
    """Decoder layers ``start <= index < end`` (0-based) of ``adapter``'s model over ``cache``.
    ``probes`` (the model's :class:`ExitProbes`) serve rows whose rule has a probe gate."""

    def __init__(
        self,
        adapter: ModelAdapter,
        start: int,
        end: int,
        cache: SlotKVCache | None = None,
        probes: ExitProbes | None = None,
    ):
        if not 0 <= start < end <= adapter.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside 0..{adapter.num_layers}")
        if probes is not None and (probes.num_layers, probes.hidden_size) != (
            adapter.num_layers,
            adapter.hidden_size,
        ):
            raise ValueError(
                f"exit probes are for {probes.num_layers} layers of width {probes.hidden_size}; "
                f"the model has {adapter.num_layers} of width {adapter.hidden_size}"
            )
        self.adapter = adapter
        self.start, self.end = start, end
        self.cache = cache if cache is not None else SlotKVCache()
        self.is_last = end == adapter.num_layers
        self.probes = probes.to(adapter.device) if probes is not None else None

    @torch.inference_mode()
    def prefill(self, slots: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Run every layer of the range over whole prompts (``hidden`` is ``[rows, tokens, D]``,
        right-padded; ``positions`` is ``[rows, tokens]``). Prompt tokens never exit: their K/V is
        needed at every depth."""
        context = _CallContext(self.adapter, self.cache, slots, positions, hidden)
        for index in range(self.start, self.end):
            hidden = context.run(index, hidden)
        return hidden

    @torch.inference_mode()
    def decode(
        self,
        rows: TokenRows,
        fill: TokenRows | None = None,
        propagate: bool = True,
        deferred: TokenRows | None = None,
    ) -> RangeOutput:
        """One decode step for ``rows`` (one token each, each with its own exit rule), plus K/V
        propagation for ``fill`` rows that exited in an earlier range. ``propagate=False`` gives
        rows that exit here no K/V in this range's deeper layers: they run on later from their exit
        layer, as ``deferred`` rows or with :meth:`verify`.

        ``deferred`` rows run at full depth without exits, each from its own entry layer
        ``exit_layer`` (1-based, in ``start..end``; ``hidden`` is that layer's output), in the
        same layer calls as ``rows``. A call writes every row's K/V before any row attends, so a
        token sees the exact K/V of its sequence's deferred rows at every layer (several rows of
        one sequence at consecutive positions are fine). The caller guarantees that at each layer
        a row runs, every earlier position of its sequence not running there already holds exact
        K/V at that layer. ``RangeOutput.deferred`` holds them with ``hidden`` = the output of
        layer ``end``, in the order given."""
        num_layers = self.adapter.num_layers
        adapter = self.adapter
        rows = replace(rows)  # the policy state is updated in place below; leave the caller's alone
        any_rule = bool((rows.rules[:, 0] <= 1.0).any())  # disabled rules have tau = inf
        if rules_use_probe(rows.rules) and self.probes is None:
            raise ValueError("a row's exit policy has a probe gate but this layer range has no exit probes")
        fill = fill if fill is not None and len(fill) else None
        fill_context = self._fill_context(fill)
        deferred = deferred if deferred is not None and len(deferred) else None
        if deferred is not None:
            entries = deferred.exit_layer.to(torch.long)
            if bool(((entries < self.start) | (entries > self.end)).any()):
                raise ValueError(f"entry layers must be in {self.start}..{self.end}, got {entries.tolist()}")
            late_hidden = deferred.hidden.clone()
        late = torch.zeros(0, dtype=torch.long)  # deferred rows running so far: only grows with depth
        context = None
        hidden = rows.hidden.unsqueeze(1)
        exited: list[TokenRows] = []
        for index in range(self.start, self.end):
            if fill is not None:
                fill_context.fill(index, fill.hidden.unsqueeze(1))
            if deferred is not None:
                joined = (entries <= index).nonzero()[:, 0]
                if len(joined) != len(late):
                    late, context = joined, None
            if not len(rows) and not len(late):
                continue
            if context is None:
                context = self._group_context(rows, deferred.select(late) if len(late) else None)
            if len(late):  # one call for the step's tokens and the deferred rows
                device_late = late.to(late_hidden.device)
                out = context.run(index, torch.cat([hidden, late_hidden[device_late].unsqueeze(1)]))
                late_hidden[device_late] = out[len(rows) :, 0]
                out = out[: len(rows)]
            else:
                out = context.run(index, hidden)
            layer = index + 1
            if any_rule and len(rows) and 2 <= layer < num_layers:
                scores = None
                if self.probes is not None and rules_use_probe(rows.rules):
                    scores = self.probes.score(layer, out[:, 0], hidden[:, 0])
                rows.state, exits = decide(
                    layer, stability(out[:, 0], hidden[:, 0]).cpu(), rows.state, rows.rules, scores
                )
                if bool(exits.any()):
                    gone = exits.nonzero()[:, 0]
                    keep = (~exits).nonzero()[:, 0]
                    done = replace(rows.select(gone), hidden=out[gone.to(out.device), 0])
                    done.exit_layer = torch.full((len(gone),), layer, dtype=torch.long)
                    exited.append(done)
                    if propagate:
                        fill = TokenRows.concat([fill, done]) if fill is not None else done
                        fill_context = self._fill_context(fill)
                    rows = rows.select(keep)
                    out = out[keep.to(out.device)]
                    context = None
            hidden = out
        rows = replace(rows, hidden=hidden[:, 0] if len(rows) else rows.hidden)
        if self.is_last:
            if len(rows):
                rows.exit_layer = torch.full((len(rows),), num_layers, dtype=torch.long)
                exited.append(rows)
            rows = TokenRows.empty(adapter.hidden_size, adapter.device, adapter.dtype)
        empty = TokenRows.empty(adapter.hidden_size, adapter.device, adapter.dtype)
        return RangeOutput(
            exited=TokenRows.concat(exited) if exited else empty,
            continuing=rows,
            fill=fill if fill is not None and not self.is_last else empty,
            deferred=replace(deferred, hidden=late_hidden) if deferred is not None else None,
        )

    def verify(self, rows: TokenRows, entry_layers: torch.Tensor) -> TokenRows:
        """Run every row to the end of the range at full depth (no exits), each from its own entry
        layer: row ``i``'s ``hidden`` is the output of layer ``entry_layers[i]`` (1-based, in
        ``start..end``), and it runs layers ``entry_layers[i] + 1 .. end``, overwriting its K/V
        there. Returns the rows with ``hidden`` = the output of layer ``end``.

        This is the speculative verification pass: :meth:`decode` with only ``deferred`` rows.
        Several rows may belong to one sequence (consecutive positions, a chunk of drafts), under
        the guarantee :meth:`decode` states for deferred rows."""
        adapter = self.adapter
        none = TokenRows.empty(adapter.hidden_size, adapter.device, adapter.dtype)
        if not len(rows):
            return rows
        return self.decode(none, deferred=replace(rows, exit_layer=entry_layers.to(torch.long))).deferred

    def _group_context(self, rows: TokenRows, late: TokenRows | None) -> _CallContext:
        """The call context for ``rows`` followed by ``late`` (deferred rows), in that order."""
        group = rows if late is None else late if not len(rows) else TokenRows.concat([rows, late])
        return _CallContext(self.adapter, self.cache, group.slots, group.positions.unsqueeze(1), group.hidden)

    def _fill_context(self, fill: TokenRows | None) -> _CallContext | None:
        if fill is None:
            return None
        return _CallContext(
            self.adapter, self.cache, fill.slots, fill.positions.unsqueeze(1), fill.hidden, fill_only=True
        )
