"""A cache layer at fixed shapes for static decoding, built from an evicted layer when static decoding starts.

`StaticLayer.from_layer` allocates buffers for a compressed layer's state (`load`) and room for the coming
tokens; `to_dynamic` gives a copy back after `generate`. In between, decoding step t writes slot
`static_base + write_offset`, where `write_offset` is a device scalar holding t, so a step is the same kernels on
the same buffers; its token's position is `static_seen_base + write_offset`. A layer that evicts while decoding
(`capacity` set) instead holds its capacity and one slot more, and each step writes its token into `free_slot`, a
fixed `[b, h]` buffer that the step's eviction refills in place (`retire`).

The buffers may be larger than the prompt needs (more rows, more slots: the extra ones invalid), so that the
next `generate`'s prompt is loaded into the same buffers in place (`fits`, `load`) and the step captured on
them replays for it (`vlmcompress.decoding.workspace`).
"""

from __future__ import annotations

import torch

from ..cache.layer import CompressedLayer, first_valid
from ..glue import additive_mask
from .grouped_sdpa import GROUPED_SDPA
from .slot_write import write_step

# What a static layer adds to a `CompressedLayer`; `to_dynamic` drops them.
STATIC_FIELDS = ("static_base", "static_seen_base", "prompt_slots", "used_slots", "write_offset", "step_slot",
                 "_static_mask", "_fixed_earliest")
# The tensors a captured step reads by address: `load` writes a new prompt's state into them in place.
BUFFERS = ("keys", "values", "slot_valid", "positions", "scores", "free_slot", "capacity", "_validity_room",
           "_mask_room")


def lowest_positions(positions: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """`[b, h, n]` True on the `count` valid slots of lowest position, wherever they lie (all valid slots where
    fewer)."""
    if count == 0:
        return torch.zeros_like(valid)
    lowest = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).topk(
        min(count, positions.shape[-1]), dim=-1, largest=False).values
    return valid & (positions <= lowest[..., -1:])


def slots_needed(layer: CompressedLayer) -> int:
    """Slots a static layer needs before its room: what `layer` holds; for a layer that evicts while decoding,
    its capacity and one slot more (after an earlier turn it may hold more slots, the extra ones invalid, which
    serve as empty slots)."""
    held = layer.keys.shape[-2]
    if layer.capacity is None:
        return held
    capacity = layer.uniform_capacity if layer.uniform_capacity is not None else int(layer.capacity.max())
    return max(held, capacity) + 1


def held_per_row(layer: CompressedLayer) -> torch.Tensor:
    """`[b, h]` valid slots of each row."""
    if layer.slot_valid is None:
        return torch.full(layer.keys.shape[:2], layer.keys.shape[2], device=layer.keys.device)
    return layer.slot_valid.sum(-1)


class StaticLayer(CompressedLayer):
    """A `CompressedLayer` whose decoding steps write in place into preallocated slots (module docstring)."""

    @classmethod
    def from_layer(cls, layer: CompressedLayer, write_offset: torch.Tensor, room: int, batch: int | None = None,
                   slots: int | None = None) -> "StaticLayer":
        """A static layer holding `layer`'s state (`load`) in buffers for `batch` samples (default: the layer's)
        and `slots` slots before `room` more for decoding (default: `slots_needed`); the rows and slots beyond
        the layer's are invalid."""
        b, h, _, d = layer.keys.shape
        batch, slots = batch or b, slots or slots_needed(layer)
        static = cls.__new__(cls)
        vars(static).update(vars(layer))
        static.write_offset, static.step_slot = write_offset, None
        # [b, h, groups, 1, slots]: the additive form of slot_valid, changed in place where a step makes a slot
        # valid (one kernel) rather than rebuilt at every step (three)
        static._static_mask = None
        static._fixed_earliest = {}
        static._validity_room = static._mask_room = None  # the eager layer's mask buffers: not used here
        static.prompt_slots = slots
        static.static_seen_base = torch.zeros(1, dtype=torch.long, device=layer.keys.device)
        evicting = layer.capacity is not None
        total = slots if evicting else slots + room
        static.keys = layer.keys.new_zeros(batch, h, total, d)
        static.values = layer.values.new_zeros(batch, h, total, d)
        static.slot_valid = torch.zeros(batch, h, total, dtype=torch.bool, device=layer.keys.device)
        if evicting:
            static.positions = layer.positions.new_zeros(batch, h, total)
            static.scores = layer.scores.new_zeros(batch, h, total) if layer.scores is not None else None
            static.free_slot = torch.zeros(batch, h, dtype=torch.long, device=layer.keys.device)
            static.capacity = layer.capacity.new_zeros(batch)
        static.load(layer)
        return static

    def fits(self, layer: CompressedLayer) -> bool:
        """Whether `load` can take `layer`: the same kind of layer, at most as many samples and slots."""
        b, h, _, d = layer.keys.shape
        return (self.keys.shape[0] >= b and self.keys.shape[1] == h and self.keys.shape[3] == d
                and layer.keys.dtype == self.keys.dtype and layer.keys.device == self.keys.device
                and (layer.capacity is None) == (self.capacity is None)
                and (layer.scores is None) == (self.scores is None)
                and slots_needed(layer) <= self.prompt_slots
                and all(fixed is None or bool((held_per_row(layer) > count).all())
                        for count, fixed in self._fixed_earliest.items()))

    def load(self, layer: CompressedLayer) -> None:
        """Write `layer`'s state (a new prompt's, compressed) into these buffers in place, so that a step
        captured on them serves it: its slots first, every other slot and row invalid."""
        b, _, held, _ = layer.keys.shape
        for name, value in vars(layer).items():
            if name not in BUFFERS:
                setattr(self, name, value)
        self.keys[:b, :, :held].copy_(layer.keys)
        self.values[:b, :, :held].copy_(layer.values)
        self.slot_valid.zero_()
        if layer.slot_valid is None:
            self.slot_valid[:b, :, :held] = True
        else:
            self.slot_valid[:b, :, :held].copy_(layer.slot_valid)
        self.static_seen_base.fill_(layer.seen_tokens)
        # Slots this prompt's decoding occupies; those of a layer that evicts: a step takes the first empty
        # slot unless its row is over capacity, so its tokens stay within them.
        self.used_slots = slots_needed(layer)
        if self.capacity is None:
            self.static_base = held
        else:
            self.static_base = 0
            self.positions[:b, :, :held].copy_(layer.positions)
            if self.scores is not None:
                self.scores[:b, :, :held].copy_(layer.scores)
            self.free_slot.fill_(held)  # the first step's token goes after the prompt's
            self.capacity.zero_()  # a padding row holds only its own token, retired at every step
            self.capacity[:b].copy_(layer.capacity)
        if self._static_mask is not None:
            self._static_mask.copy_(additive_mask(self.slot_valid[:, :, None, None], self._static_mask.dtype)
                                    .expand_as(self._static_mask))
        for count, fixed in self._fixed_earliest.items():
            if fixed is not None:
                self._sinks(count, into=fixed)

    def make_room(self, filled: int, room: int) -> None:
        """Keep the first `filled` slots and preallocate `room` more, invalid until written. A layer that evicts
        while decoding keeps its buffers: only its position base moves."""
        self.static_seen_base.fill_(self.seen_tokens)
        if self.capacity is not None:
            return
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys[:, :, :filled], self.keys.new_zeros(b, h, room, d)], dim=2)
        self.values = torch.cat([self.values[:, :, :filled], self.values.new_zeros(b, h, room, d)], dim=2)
        valid = self.slot_valid[..., :filled]
        self.slot_valid = torch.cat([valid, valid.new_zeros(b, h, room)], dim=-1)
        self._static_mask = None
        self.static_base = self.prompt_slots = filled

    def to_dynamic(self, filled: int, batch: int) -> CompressedLayer:
        """A `CompressedLayer` with copies of the first `batch` rows, so that a next turn can append to it while
        these buffers serve another `generate`: a layer that does not evict keeps its first `filled` slots (the
        room's unwritten rest goes), one that evicts the slots its prompt's decoding used, the slot it retired
        last left invalid."""
        end = filled if self.capacity is None else self.used_slots
        dynamic = CompressedLayer.__new__(CompressedLayer)
        vars(dynamic).update({name: value for name, value in vars(self).items() if name not in STATIC_FIELDS})
        for name in ("keys", "values", "slot_valid", "positions", "scores"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(dynamic, name, tensor[:batch, :, :end].clone())
        if self.capacity is not None:
            dynamic.capacity = self.capacity[:batch].clone()
        dynamic.free_slot = None
        if bool(dynamic.slot_valid.all()):
            dynamic.slot_valid = None
        dynamic._validity_room = dynamic._mask_room = None
        return dynamic

    # ----- one step ----------------------------------------------------------------------------------------
    def static_position(self) -> torch.Tensor:
        """`[1]`: the position of the token the current step writes."""
        return self.write_offset + self.static_seen_base

    def newest_position(self) -> torch.Tensor:
        # a device scalar: a host int would be baked into the captured step
        return self.static_position()

    def start_step(self, slot: torch.Tensor) -> None:
        """Before a step's attention: the slot its token is written to becomes valid (the token attends to
        itself). For a layer that does not evict that is `slot` (`[1]`, `static_base + write_offset`, which
        `StaticDecoding` adds up for all layers at once), kept here for `update`, which writes the token and
        marks the slot in one kernel (`write_step`); a slot chosen by eviction (`free_slot`) is marked here, and
        also takes the token's position and, for a method that accumulates scores, a score of zero."""
        if self.capacity is None:
            self.step_slot = slot
            return
        slot = self.free_slot[..., None]
        self.slot_valid.scatter_(-1, slot, True)
        mask = self._static_mask
        if mask is not None:
            b, h, groups = mask.shape[:3]
            mask.scatter_(-1, slot[:, :, None, None].expand(b, h, groups, 1, 1), 0.0)
        self.positions.scatter_(-1, slot, self.static_position().expand_as(slot))
        if self.scores is not None:
            self.scores.scatter_(-1, slot, 0.0)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.capacity is not None:
            self._write_at_free_slot(key_states, value_states)
            return self.keys, self.values
        write_step(self.keys, self.values, key_states, value_states, self.step_slot, self.slot_valid,
                   self._static_mask)
        return self.keys, self.values

    def retire(self, scores: torch.Tensor) -> None:
        """After a step's attention, choose the slot of the next token, in place and without the host: a row
        (sample, KV head) holding more than its capacity retires its lowest-scored live slot (eager decoding's
        eviction); any other takes its first empty slot (room not yet grown into, padding)."""
        over = self.slot_valid.sum(-1) > self.capacity[:, None]  # [b, h]
        # Where over, the argmin runs over the live slots only; elsewhere it lands on an empty slot's -inf.
        empty_score = torch.where(over, float("inf"), float("-inf"))[..., None]
        choice = torch.where(self.slot_valid, scores, empty_score).argmin(dim=-1)
        # The additive mask keeps the retired slot unmasked: the next step writes its token there and
        # unmasks it anyway (an empty slot chosen here needs that) before any attention reads the mask.
        self.slot_valid.scatter_(-1, choice[..., None], False)
        self.free_slot.copy_(choice)

    def earliest_valid(self, count: int) -> torch.Tensor:
        """As `CompressedLayer.earliest_valid`; but a step may write a token into an empty slot before them, so
        they are found at the first step (before any capture: the prompt's slots are in order and the new token
        comes after them) and fixed after, for the caller never retires them and a row holding more than
        `count` tokens makes no new ones. Where some row holds fewer (its next tokens join them), they are
        searched by position at every step."""
        if count not in self._fixed_earliest:
            self._fixed_earliest[count] = self._sinks(count)
        fixed = self._fixed_earliest[count]
        return fixed if fixed is not None else lowest_positions(self.positions, self.slot_valid, count)

    def _sinks(self, count: int, into: torch.Tensor | None = None) -> torch.Tensor | None:
        """The first `count` valid slots of each row (written in place into `into`, which a captured step reads),
        or None where some sample's row holds `count` or fewer (a batch's padding rows, capacity 0, hold none)."""
        short = (self.slot_valid.sum(-1) <= count) & (self.capacity[:, None] > 0)
        if into is None and bool(short.any()):
            return None
        sinks = first_valid(self.slot_valid, count)
        return sinks if into is None else into.copy_(sinks)

    def undo_steps(self, written: int, steps: int) -> None:
        """Mask again the slots of the last `steps` of the `written` steps (`StaticDecoding.undo_steps`)."""
        start = self.static_base + written
        self.slot_valid[..., start: start + steps] = False
        if self._static_mask is not None:
            self._static_mask[..., start: start + steps] = torch.finfo(self._static_mask.dtype).min
        self.seen_tokens -= steps

    def decode_mask(self, implementation: str, groups: int, query_length: int, dtype: torch.dtype):
        """`[b, h * groups, 1, slots]` additive mask of the buffers (one group per KV head for `GROUPED_SDPA`):
        0 on filled slots (the step's own included, marked valid before the step), the dtype's minimum on
        padding and unfilled room. Built from `slot_valid` once per room; each step then unmasks its own slot
        in place."""
        if "flash" in implementation:
            raise NotImplementedError(
                f"static decoding (cuda_graphs=True) masks the cache's unfilled room, which {implementation} "
                f"cannot take: load with attn_implementation={GROUPED_SDPA!r} or 'sdpa'")
        groups = 1 if implementation == GROUPED_SDPA else groups
        mask = self._static_mask
        if mask is None or mask.dtype != dtype or mask.shape[2] != groups:
            mask = additive_mask(self.slot_valid[:, :, None, None], dtype).expand(-1, -1, groups, -1, -1)
            self._static_mask = mask = mask.contiguous()
        b, h = mask.shape[:2]
        return mask.view(b, h * groups, 1, mask.shape[-1])

    def _select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError("a statically decoding cache cannot change its batch (beam search)")
