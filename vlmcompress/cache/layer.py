"""One layer of an eviction cache: its key/value tensors, what each slot holds, and how a decoding step
writes, masks and evicts (`CompressedLayer`). Static decoding builds its own layer from this one
(`vlmcompress.decoding.static_layer`)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..decoding.grouped_sdpa import GROUPED_SDPA
from ..glue import additive_mask

# Decoding steps one allocation of a padded layer's validity and mask buffers lasts (CompressedLayer).
ROOM = 256

# Fields indexed by sample, reordered with the batch (beam search, batch selection).
PER_SAMPLE = ("positions", "slot_valid", "scores", "capacity", "kept_indices", "free_slot")


def first_valid(valid: torch.Tensor, count: int) -> torch.Tensor:
    """`[b, h, n]` True on the first `count` valid slots of each row."""
    return valid & (valid.long().cumsum(-1) <= count)


class CompressedLayer(DynamicLayer):
    """One layer's keys/values `[batch, kv_heads, slots, head_dim]` plus what eviction needs.

    positions: `[b, h, slots]` original position of each slot (kept only for decode-time eviction).
    slot_valid: `[b, h, slots]` False where a slot must not be attended (left padding, a retired
        slot awaiting compaction or overwrite); None when every slot is valid.
    scores: `[b, h, slots]` running scores a decode-time method accumulates (H2O), or None.
    capacity: `[b]` slots a sample may hold while decoding (decode-time methods), or None.
    kept_indices: `[b, h, kept]` the prompt positions kept at prefill, sorted.
    free_slot: `[b, h]` the slot retired after the last decoding step: the next token is written into it in
        place, so a cache at its budget neither grows nor is copied while decoding.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.positions: torch.Tensor | None = None
        self.slot_valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.capacity: torch.Tensor | None = None
        self.kept_indices: torch.Tensor | None = None
        self.compressed = False
        self.free_slot: torch.Tensor | None = None
        self.uniform_capacity: int | None = None  # host copy of `capacity` when equal for all rows
        # Decoding is launch-bound: a padded layer's validity and its additive mask live in buffers with
        # room for the coming tokens (valid, mask 0), so a step takes views of them and launches no kernel.
        self._validity_room: torch.Tensor | None = None  # [b, h, room] bool; slot_valid is a prefix view
        self._mask_room: torch.Tensor | None = None  # [b, h, 1, room] additive form of _validity_room

    # ----- writing ----------------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if self.free_slot is not None and new == 1:
            return self._write_in_place(key_states, value_states)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.compressed:
            b, h = key_states.shape[:2]
            if self.positions is not None:
                fresh = torch.arange(self.seen_tokens, self.seen_tokens + new, device=keys.device)
                self.positions = torch.cat([self.positions, fresh.expand(b, h, new)], dim=-1)
            if self.slot_valid is not None:
                self.slot_valid = self.validity_with_room(new)[..., : self.slot_valid.shape[-1] + new]
            if self.scores is not None:
                self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, new)], dim=-1)
        self.seen_tokens += new
        return keys, values

    def _write_at_free_slot(self, key_states, value_states):
        index = self.free_slot[..., None, None].expand(-1, -1, 1, self.keys.shape[-1])
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)

    def _write_in_place(self, key_states, value_states):
        slot = self.free_slot[..., None]  # [b, h, 1]
        self._write_at_free_slot(key_states, value_states)
        self.positions.scatter_(2, slot, torch.full_like(slot, self.seen_tokens))
        if self.scores is not None:
            self.scores.scatter_(2, slot, torch.zeros_like(slot, dtype=self.scores.dtype))
        self.free_slot = None
        self.seen_tokens += 1
        return self.keys, self.values

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only `slots` `[b, h, k]` (ascending) of the stored tensors; the rest is freed."""
        index = slots[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        for name in ("positions", "slot_valid", "scores"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.gather(2, slots))

    # ----- what decode-time methods read --------------------------------------------------------------
    def newest_position(self) -> int | torch.Tensor:
        """Position of the newest token held (a host int here; a device scalar in a static layer)."""
        return self.seen_tokens - 1

    def earliest_valid(self, count: int) -> torch.Tensor:
        """`[b, h, slots]` True on the `count` valid slots of lowest position, which the caller never retires
        (StreamingLLM's sinks). Here they are the first valid slots: the prompt's slots stay in order, and a new
        token goes after them or into a retired slot, which is never one of them."""
        valid = self.slot_valid if self.slot_valid is not None else torch.ones_like(self.positions, dtype=torch.bool)
        return first_valid(valid, count)

    def attended_keys(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The held keys `[b, h, slots, d]` and which slots are attended (`slot_valid`), for decode-time scores."""
        return self.keys, self.slot_valid

    # ----- decode-time eviction ----------------------------------------------------------------------------
    def retire(self, scores: torch.Tensor) -> None:
        """After a decoding step, retire the lowest-`scores` slots of each row holding more than its capacity."""
        steady = self.slot_valid is None and self.uniform_capacity is not None
        if steady and self.held_tokens <= self.uniform_capacity:
            return  # still under budget
        if steady and self.held_tokens == self.uniform_capacity + 1:
            # Every row is one over its budget: retire its lowest-scored slot and let the next token
            # take that slot, with no copy of the cache and no device-to-host synchronisation.
            self.free_slot = scores.argmin(dim=-1)
            return
        valid = self.slot_valid
        if valid is None:
            valid = torch.ones_like(scores, dtype=torch.bool)
        over = (valid.sum(-1) - self.capacity.to(valid.device)[:, None]).clamp(min=0)  # [b, h]
        if bool(over.any()):
            ascending = scores.masked_fill(~valid, float("inf")).argsort(dim=-1)
            rank = torch.empty_like(ascending)
            rank.scatter_(-1, ascending, torch.arange(ascending.shape[-1], device=rank.device).expand_as(rank))
            valid = valid & ~(rank < over[..., None])
        invalid = ~valid
        removable = int(invalid.sum(-1).min())
        self.slot_valid = valid
        if removable > 0:
            drop = invalid & (invalid.cumsum(-1) <= removable)
            survivors = (~drop).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
            self.keep(survivors[..., : valid.shape[-1] - removable])
        if bool(self.slot_valid.all()):
            self.slot_valid = None

    # ----- masks -------------------------------------------------------------------------------------------
    def decode_mask(self, implementation: str, groups: int, query_length: int, dtype: torch.dtype):
        """The mask one decoding forward needs, in the form its attention expects: per KV head (boolean) for
        `GROUPED_SDPA`, which then needs no `repeat_kv`; per query head (additive, `groups` query heads per KV
        head) for other SDPA or eager attention; the 2-D padding mask for flash-attention. None: no mask."""
        valid = self.slot_valid
        if valid is None and query_length == 1:
            return None
        if query_length == 1 and implementation == GROUPED_SDPA:
            return self.additive_decode_mask(dtype)
        batch, kv_heads, held = self.keys.shape[:3]
        device = self.keys.device
        if valid is None:
            valid = torch.ones(batch, kv_heads, held, dtype=torch.bool, device=device)
        if "flash" in implementation:
            if not bool((valid == valid[:, :1]).all()):
                raise NotImplementedError(
                    "flash-attention takes one padding mask for all heads, but this cache holds head-specific "
                    f"padding; use attn_implementation={GROUPED_SDPA!r} for batched generation with this method"
                )
            new = torch.ones(batch, query_length, dtype=torch.long, device=device)
            return torch.cat([valid[:, 0].long(), new], dim=-1)
        # [b, kv_heads, q, held + q]: the held slots' validity, then causal among the new tokens
        allowed = torch.nn.functional.pad(valid[:, :, None].expand(-1, -1, query_length, -1), (0, query_length),
                                          value=True)
        if query_length > 1:
            allowed[..., held:] = torch.ones(query_length, query_length, dtype=torch.bool, device=device).tril()
        if implementation == GROUPED_SDPA:
            return allowed
        return additive_mask(allowed.repeat_interleave(groups, dim=1), dtype)

    def validity_with_room(self, new: int) -> torch.Tensor:
        """The buffer whose prefix is `slot_valid`, followed by at least `new` valid slots. Reallocated (and
        `slot_valid` made its prefix view) only when `slot_valid` is no longer its prefix (eviction replaced
        it) or the room ran out, so one allocation serves `ROOM` decoding steps."""
        valid, room = self.slot_valid, self._validity_room
        held = valid.shape[-1]
        is_prefix = (room is not None and valid.data_ptr() == room.data_ptr() and valid.stride() == room.stride()
                     and valid.shape[:2] == room.shape[:2])
        if not is_prefix or room.shape[-1] < held + new:
            room = torch.ones(*valid.shape[:2], held + new + ROOM, dtype=torch.bool, device=valid.device)
            room[..., :held] = valid
            self._validity_room, self._mask_room = room, None
            self.slot_valid = room[..., :held]
        return room

    def additive_decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`[b, h, 1, held + 1]`: 0 where one new token may attend (its own slot included), the dtype's
        minimum where not; a view of `_mask_room`."""
        room = self.validity_with_room(1)
        if self._mask_room is None or self._mask_room.dtype != dtype:
            self._mask_room = additive_mask(room[:, :, None], dtype)
        return self._mask_room[..., : self.slot_valid.shape[-1] + 1]

    @property
    def needs_decode_mask(self) -> bool:
        """Whether decoding must mask some held slot (so the cache keeps its mask hooks)."""
        return self.slot_valid is not None

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    def kept_tokens(self) -> int:
        """Tokens kept at prefill per KV head (of the sample keeping most)."""
        return self.kept_indices.shape[-1]

    def get_seq_length(self) -> int:
        # Tokens seen, not held: the models derive positions (rotary phases) from it.
        return self.seen_tokens

    @property
    def held_tokens(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def live_tokens(self) -> torch.Tensor:
        """`[b, kv_heads]` slots the next token attends to, on the CPU: held, less padding and the retired slot
        the next token will overwrite (invalid in `slot_valid` where there is one)."""
        b, h, held = self.keys.shape[:3]
        if self.slot_valid is None:
            return torch.full((b, h), held - (1 if self.free_slot is not None else 0), dtype=torch.long)
        return self.slot_valid.sum(-1).cpu()

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        query_length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.held_tokens + query_length, 0

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # ----- transformers' cache operations ------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _select_batch(self, index: torch.Tensor) -> None:
        for name in PER_SAMPLE:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in PER_SAMPLE:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))
