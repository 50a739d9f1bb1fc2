"""Engine-owned KV storage, handed to Hugging Face layers through their ``cache=`` argument.

Storage is one ``[slots, kv_heads, capacity, head_dim]`` tensor pair per layer; a sequence owns
one slot for its lifetime. Two modes: *growable* (the engine: slots and capacity grow by copying
as sequences come) and *fixed* (a serving replica: ``num_slots`` x ``capacity`` sized once from
its KV budget, never copied, so memory use is known at start as vLLM does it). A fixed pool is
allocated uninitialised and each slot is zeroed as far as its calls read, so a slot costs
resident memory on a CPU for the positions its sequences use.

Layers see a :class:`CacheView` for the rows of the current call: its ``update`` writes the new
K/V at each row's positions and returns the rows' K/V so far, which is the whole protocol Hugging
Face attention modules use. Shapes and dtypes come from the first write, so nothing here depends
on the architecture.
"""

from __future__ import annotations

import torch

from sedac_ray.model.adapter import KVWritten


class SlotKVCache:
    """Per-layer K/V for many sequences, addressed by slot and position."""

    def __init__(
        self, initial_capacity: int = 64, *, num_slots: int | None = None, capacity: int | None = None
    ):
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.fixed = num_slots is not None
        if self.fixed:
            if capacity is None or num_slots < 1 or capacity < 1:
                raise ValueError(
                    f"a fixed pool needs num_slots >= 1 and capacity >= 1, got {num_slots}, {capacity}"
                )
            initial_capacity = capacity
        self._capacity = initial_capacity
        self._num_slots = num_slots or 0
        self._free: list[int] = list(reversed(range(self._num_slots)))
        # Fixed pool: positions < _zeroed[slot] of each slot hold finite values (zeros or K/V).
        self._zeroed: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        """Positions each slot holds."""
        return self._capacity

    # ---- slots -----------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def slots_in_use(self) -> int:
        return self._num_slots - len(self._free)

    @property
    def free_slots(self) -> int:
        """Slots a fixed pool can still hand out (a growable one always has room)."""
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Slots for ``count`` new sequences; freed slots are reused first."""
        if self.fixed and count > len(self._free):
            raise ValueError(f"the KV pool has {len(self._free)} free slots, {count} were asked for")
        slots = []
        while self._free and len(slots) < count:
            slots.append(self._free.pop())
        fresh = count - len(slots)
        if fresh:
            slots.extend(range(self._num_slots, self._num_slots + fresh))
            self._grow(num_slots=self._num_slots + fresh, capacity=self._capacity)
        return slots

    def free(self, slots) -> None:
        """Return slots; their contents are left to be overwritten by the next owner."""
        for slot in slots:
            if slot in self._free or not 0 <= slot < self._num_slots:
                raise ValueError(f"slot {slot} is not allocated")
            self._free.append(slot)

    @torch.inference_mode()
    def truncate(self, slot: int, length: int) -> None:
        """Forget positions ``>= length`` of ``slot`` in every layer (a speculative rollback): they
        become zeros again, exactly as if nothing had been written there."""
        if not 0 <= slot < self._num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        for store in (self._keys, self._values):
            for tensor in store.values():
                tensor[slot, :, length:] = 0

    def reserve(self, length: int) -> None:
        """Make room for positions ``< length`` in every slot (capacity doubles)."""
        if length > self._capacity and self.fixed:
            raise ValueError(f"position {length - 1} is past the pool's {self._capacity} positions per slot")
        if length > self._capacity:
            capacity = self._capacity
            while capacity < length:
                capacity *= 2
            self._grow(num_slots=self._num_slots, capacity=capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))

    def _grow(self, num_slots: int, capacity: int) -> None:
        for store in (self._keys, self._values):
            for layer, old in store.items():
                # Zeros, not garbage: masked keys still enter q.k, and NaN * 0 is NaN.
                new = old.new_zeros(num_slots, old.shape[1], capacity, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                store[layer] = new
        self._num_slots, self._capacity = num_slots, capacity

    # ---- the per-call view layers write through --------------------------------------------

    def view(self, slots, positions: torch.Tensor, fill_only: bool = False) -> CacheView:
        """A view for rows ``slots`` whose new tokens sit at ``positions`` (``[rows, tokens]``)."""
        return CacheView(self, slots, positions, fill_only)

    def _storage(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._keys:
            shape = (self._num_slots, like.shape[1], self._capacity, like.shape[3])
            if self.fixed:  # pages of slots never used stay unallocated
                self._keys[layer], self._values[layer] = like.new_empty(shape), like.new_empty(shape)
                for slot, length in self._zeroed.items():
                    self._keys[layer][slot, :, :length].zero_()
                    self._values[layer][slot, :, :length].zero_()
            else:
                self._keys[layer] = like.new_zeros(shape)
                self._values[layer] = like.new_zeros(shape)
        return self._keys[layer], self._values[layer]

    @torch.inference_mode()
    def _zero_up_to(self, slots: list[int], length: int) -> None:
        """Zero positions ``< length`` of each slot not zeroed yet. Zeros, not garbage: masked keys
        still enter q.k, and NaN * 0 is NaN. Only what a call can read is touched, so a slot costs
        resident memory for the positions its sequences use, not for its whole capacity. No real
        K/V is lost: a write at position p happens in a call that reads p + 1 positions, which
        zeroes that far first."""
        for slot in slots:
            done = self._zeroed.get(slot, 0)
            if done < length:
                for tensor in (*self._keys.values(), *self._values.values()):
                    tensor[slot, :, done:length].zero_()
                self._zeroed[slot] = length

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of one slot's first ``length`` positions (``[kv_heads, length, head_dim]``); for tests."""
        return self._keys[layer][slot, :, :length], self._values[layer][slot, :, :length]


class CacheView:
    """What a decoder layer sees as its ``cache``: writes go to this call's rows and positions."""

    def __init__(self, cache: SlotKVCache, slots, positions: torch.Tensor, fill_only: bool):
        self.cache = cache
        slot_list = [int(s) for s in slots]
        self.positions = positions
        self.fill_only = fill_only
        self.key_length = int(positions.max()) + 1
        cache.reserve(self.key_length)
        if cache.fixed:
            cache._zero_up_to(slot_list, self.key_length)
        self._slot_index = torch.tensor(slot_list, device=positions.device).unsqueeze(1)
        first = slot_list[0] if slot_list else 0
        # Rows in consecutive slots read their K/V as a view instead of a gather.
        self._slot_range = (
            slice(first, first + len(slot_list))
            if slot_list == list(range(first, first + len(slot_list)))
            else None
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.cache._storage(layer_idx, key_states)
        # [rows, heads, tokens, dim] -> [rows, tokens, heads, dim] to match the advanced index.
        keys[self._slot_index, :, self.positions] = key_states.transpose(1, 2)
        values[self._slot_index, :, self.positions] = value_states.transpose(1, 2)
        if self.fill_only:
            raise KVWritten
        if self._slot_range is not None:
            return keys[self._slot_range, :, : self.key_length], values[
                self._slot_range, :, : self.key_length
            ]
        rows = self._slot_index[:, 0]
        return keys[rows, :, : self.key_length], values[rows, :, : self.key_length]
