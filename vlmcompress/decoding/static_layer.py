"""A cache layer at fixed shapes for static decoding, built from an evicted layer when static decoding starts.

`StaticLayer.from_layer` takes over a `CompressedLayer`'s tensors after the prompt is compressed and gives them
room for the coming tokens; `to_dynamic` gives them back after `generate`. In between, decoding step t writes
slot `static_base + write_offset`, where `write_offset` is a device scalar holding t, so a step is the same
kernels on the same buffers; its token's position is `static_seen_base + write_offset`. A layer that evicts while
decoding (`capacity` set) instead holds its capacity and one slot more, and each step writes its token into
`free_slot`, a fixed `[b, h]` buffer that the step's eviction refills in place (`retire`).
"""

from __future__ import annotations

import torch

from ..cache.layer import CompressedLayer, first_valid
from ..glue import additive_mask
from .grouped_sdpa import GROUPED_SDPA

# What a static layer adds to a `CompressedLayer`; `to_dynamic` drops them.
STATIC_FIELDS = ("static_base", "static_seen_base", "write_offset", "step_slot", "_static_mask", "_fixed_earliest")


def lowest_positions(positions: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """`[b, h, n]` True on the `count` valid slots of lowest position, wherever they lie (all valid slots where
    fewer)."""
    if count == 0:
        return torch.zeros_like(valid)
    lowest = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).topk(
        min(count, positions.shape[-1]), dim=-1, largest=False).values
    return valid & (positions <= lowest[..., -1:])


class StaticLayer(CompressedLayer):
    """A `CompressedLayer` whose decoding steps write in place into preallocated slots (module docstring)."""

    @classmethod
    def from_layer(cls, layer: CompressedLayer, write_offset: torch.Tensor, room: int) -> "StaticLayer":
        """`layer`'s state (its tensors, not copies) with `room` preallocated slots for decoding."""
        static = cls.__new__(cls)
        vars(static).update(vars(layer))
        static.static_base, static.write_offset, static.step_slot = 0, write_offset, None
        # [b, h, groups, 1, slots]: the additive form of slot_valid, changed in place where a step makes a slot
        # valid (one kernel) rather than rebuilt at every step (three)
        static._static_mask = None
        static._fixed_earliest = {}
        if static.capacity is not None:
            static._make_evicting_room()
        else:
            static.make_room(static.held_tokens, room)
        static.static_seen_base = static.seen_tokens
        return static

    def make_room(self, filled: int, room: int) -> None:
        """Keep the first `filled` slots and preallocate `room` more, invalid until written. A layer that evicts
        while decoding keeps its buffers: only its position base moves."""
        self.static_seen_base = self.seen_tokens
        if self.capacity is not None:
            return
        b, h, _, d = self.keys.shape
        valid = self.slot_valid[..., :filled] if self.slot_valid is not None else self.keys.new_ones(
            b, h, filled, dtype=torch.bool)
        self.keys = torch.cat([self.keys[:, :, :filled], self.keys.new_zeros(b, h, room, d)], dim=2)
        self.values = torch.cat([self.values[:, :, :filled], self.values.new_zeros(b, h, room, d)], dim=2)
        self.slot_valid = torch.cat([valid, valid.new_zeros(b, h, room)], dim=-1)
        self._validity_room = self._mask_room = self._static_mask = None
        self.static_base = filled

    def _make_evicting_room(self) -> None:
        """Eager decoding's steady state at fixed shapes: `max(capacity) + 1` slots, each step's token written
        into `free_slot` (first the slot after the prompt's). Padding, room not yet grown into and the retired
        slot are invalid."""
        b, h, held, _ = self.keys.shape
        # A layer holds at most its capacity after prefill; after an earlier turn it may hold more slots, the
        # extra ones invalid, which serve as empty slots.
        empty = max(1, int(self.capacity.max()) + 1 - held)
        valid = self.slot_valid
        if valid is None:
            valid = self.keys.new_ones(b, h, held, dtype=torch.bool)

        def grown(tensor):
            return torch.cat([tensor, tensor.new_zeros(b, h, empty, *tensor.shape[3:])], dim=2)

        self.keys, self.values, self.positions, self.slot_valid = map(grown, (self.keys, self.values, self.positions,
                                                                              valid))
        if self.scores is not None:
            self.scores = grown(self.scores)
        self.free_slot = torch.full((b, h), held, dtype=torch.long, device=self.keys.device)
        self._validity_room = self._mask_room = None

    def to_dynamic(self, filled: int) -> CompressedLayer:
        """Back to a `CompressedLayer` after static decoding, so that a next turn can append to it: a layer that
        does not evict keeps its first `filled` slots (the room's unwritten rest goes), one that evicts keeps
        its buffers, the slot it retired last left invalid."""
        if self.capacity is None:
            self.keys, self.values = self.keys[:, :, :filled], self.values[:, :, :filled]
            self.slot_valid = self.slot_valid[..., :filled]
        dynamic = CompressedLayer.__new__(CompressedLayer)
        vars(dynamic).update({name: value for name, value in vars(self).items() if name not in STATIC_FIELDS})
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
        `StaticDecoding` adds up for all layers at once); a slot chosen by eviction (`free_slot`) also takes the
        token's position and, for a method that accumulates scores, a score of zero."""
        if self.capacity is None:
            self.step_slot = slot
            self.slot_valid.index_fill_(-1, slot, True)
            if self._static_mask is not None:
                self._static_mask.index_fill_(-1, slot, 0.0)
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
        self.keys.index_copy_(2, self.step_slot, key_states)
        self.values.index_copy_(2, self.step_slot, value_states)
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
            enough = bool((self.slot_valid.sum(-1) > count).all())
            self._fixed_earliest[count] = first_valid(self.slot_valid, count) if enough else None
        fixed = self._fixed_earliest[count]
        return fixed if fixed is not None else lowest_positions(self.positions, self.slot_valid, count)

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
