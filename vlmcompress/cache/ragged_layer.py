"""A layer whose KV heads hold different numbers of tokens (head-adaptive budgets): ragged storage, no padding.

Each (sample, KV head) segment's kept keys and values are stored flat, one segment after another, in (sample,
head) order: `keys`/`values` `[total, head_dim]`, with each segment's `starts` and `lengths`. Right after the
prompt the store holds exactly the kept tokens; decoding appends each step's token to every segment, into room
left after each segment, reallocated with `GROWTH` more slots per segment when some segment's room runs out.
Decoding attends it through `vlmcompress_ragged` (`decoding.ragged_attention`), to which the cache's mask
pre-hook passes the segments (`decode_mask`).

A decode-time method (H2O) keeps each segment at its own capacity (its prefill count): after a step, a segment
over it retires its lowest-scored slot, and the next token is written there instead of appended. What such a
method reads, `positions` and `scores`, are per-slot numbers, held `[b, kv_heads, widest]` (-1 / 0 past a
segment's end): a few bytes a slot, where the keys and values stay ragged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..decoding.ragged_attention import RAGGED_ATTENTION, RaggedSegments

# Decoding steps one allocation of room lasts (per segment): bytes held are the kept tokens plus at most this.
GROWTH = 32


def padded_slots(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(slots, held)` `[b, h, widest]` of `kept` `[b, h, n]`: each row's kept positions ascending (held), then
    positions it did not keep (not held), so that no position is gathered twice in a row."""
    n = kept.shape[-1]
    position = torch.arange(n, device=kept.device)
    counts = kept.sum(-1, keepdim=True)
    widest = int(counts.max())
    slots = torch.where(kept, position, n + position).argsort(dim=-1)[..., :widest]
    return slots, torch.arange(widest, device=kept.device) < counts


class RaggedLayer(DynamicLayer):
    """One layer's keys/values stored ragged over its (sample, KV head) segments.

    keys, values: `[total, head_dim]`, the segments one after another, each followed by its unfilled room.
    starts, lengths: `[batch * kv_heads]` on the store's device: where each segment starts, tokens it holds.
    kept_indices: `[b, kv_heads, widest]` the prompt positions each head kept, ascending, padded with -1.
    Decode-time eviction only: capacity `[b]` (the sample's budget), positions and scores `[b, kv_heads,
    widest]` of the slots (-1 and 0 past a segment's end), free_slot `[batch * kv_heads]` the slot the next
    token overwrites in the segments over their capacity (`over_capacity`, on the host).
    """

    compressed = True
    is_croppable = False
    needs_decode_mask = True  # the segments travel as the mask

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept_indices: torch.Tensor, seen_tokens: int):
        """From the kept keys/values `[b, h, widest, d]` of the positions `kept_indices` `[b, h, widest]` (each
        row ascending, then -1 where it holds nothing)."""
        super().__init__()
        self.batch, self.kv_heads = kept_indices.shape[:2]
        self.device = keys.device
        held = kept_indices >= 0
        counts = held.sum(-1).flatten()
        # host copies of the segments' sizes, so that the host never waits for the device to know them
        self.host_lengths = counts.cpu()
        self.host_room = torch.zeros_like(self.host_lengths)  # free slots after each segment
        self.lengths = counts
        self.starts = counts.cumsum(0) - counts
        self.keys, self.values = keys[held], values[held]  # (sample, head, position) order: the segments
        self.kept_indices = kept_indices
        self.seen_tokens = seen_tokens
        self.is_initialized = True
        self.capacity = self.positions = self.scores = self.free_slot = None
        self.host_capacity = None  # [segments] decode-time eviction: tokens each segment may hold
        self.over_capacity = torch.zeros_like(self.host_lengths, dtype=torch.bool)  # has a free slot

    @classmethod
    def from_selection(cls, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, seen_tokens: int,
                       merge=None, key_valid: torch.Tensor | None = None) -> "RaggedLayer":
        """From a prompt's `keys`/`values` `[b, h, n, d]` and the kept (head, position) pairs `kept` `[b, h, n]`;
        a merging strategy (`cache.merge`) first merges the evicted entries (not `key_valid`'s padding) into them."""
        slots, held = padded_slots(kept)
        index = slots[..., None].expand(-1, -1, -1, keys.shape[-1])
        kept_keys, kept_values = keys.gather(2, index), values.gather(2, index)
        if merge is not None:
            kept_keys, kept_values = merge(keys, values, slots, kept_keys, kept_values, held, key_valid)
        return cls(kept_keys, kept_values, slots.masked_fill(~held, -1), seen_tokens)

    def evict_while_decoding(self, running: torch.Tensor | None, capacity: torch.Tensor, extra: torch.Tensor) -> None:
        """Keep each segment at its prefill count plus `extra[b]` (an int budget above the prompt: room to grow
        into), retiring slots by a decode-time method's scores; `running` `[b, h, n]` are its prompt scores,
        `capacity` `[b]` (on the CPU) each sample's budget."""
        held = self.kept_indices >= 0
        self.capacity = capacity.to(self.device)
        self.host_capacity = self.host_lengths + extra.repeat_interleave(self.kv_heads)
        self.positions = self.kept_indices.clone()
        self.scores = (torch.zeros(held.shape, dtype=torch.float64, device=self.device) if running is None
                       else running.gather(-1, self.kept_indices.clamp(min=0)).masked_fill(~held, 0.0))

    # ----- writing ----------------------------------------------------------------------------------------
    def reserve(self, new: int) -> None:
        """Make room for `new` more tokens in every segment that appends (reallocating the stores with `GROWTH`
        spare slots after every segment)."""
        if bool((self.host_room[~self.over_capacity] >= new).all()):
            return
        segment = torch.repeat_interleave(torch.arange(len(self.host_lengths)), self.host_lengths)
        offset = torch.arange(len(segment)) - (self.host_lengths.cumsum(0) - self.host_lengths)[segment]
        capacity = self.host_lengths + new + GROWTH
        starts = capacity.cumsum(0) - capacity
        source = (self.starts.cpu()[segment] + offset).to(self.device)
        target = (starts[segment] + offset).to(self.device)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_zeros(int(capacity.sum()), old.shape[-1])
            grown[target] = old[source]
            setattr(self, name, grown)
        self.starts = starts.to(self.device)
        self.host_room = capacity - self.host_lengths

    def _appended(self, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(on the host, on the device)`: tokens each segment grows by this step, `new` or, over its capacity
        (the token then takes its free slot), none."""
        grows = (~self.over_capacity).long() * new
        return grows, grows.to(self.device, non_blocking=True)

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the step's `[b, h, q, d]` tokens into every segment (appended, or into its free slot)."""
        new = key_states.shape[-2]
        if self.free_slot is not None and new > 1:
            raise NotImplementedError("a head-adaptive cache evicting while decoding takes one token per step")
        self.reserve(new)
        slot = self.lengths if self.free_slot is None else torch.where(self.free_slot >= 0, self.free_slot,
                                                                         self.lengths)
        slots = slot[:, None] + torch.arange(new, device=self.device)  # [segments, new]
        target = (self.starts[:, None] + slots).flatten()
        self.keys.index_copy_(0, target, key_states.reshape(-1, key_states.shape[-1]))
        self.values.index_copy_(0, target, value_states.reshape(-1, value_states.shape[-1]))
        grows, grows_here = self._appended(new)
        if self.positions is not None:
            widest = int((self.host_lengths + grows).max())
            if widest > self.positions.shape[-1]:
                more = widest - self.positions.shape[-1]
                self.positions = torch.nn.functional.pad(self.positions, (0, more), value=-1)
                self.scores = torch.nn.functional.pad(self.scores, (0, more), value=0.0)
            fresh = self.seen_tokens + torch.arange(new, device=self.device)
            self.positions.view(-1, self.positions.shape[-1]).scatter_(1, slots, fresh.expand_as(slots))
            self.scores.view(-1, self.scores.shape[-1]).scatter_(1, slots, 0.0)
        self.lengths = self.lengths + grows_here
        self.host_lengths = self.host_lengths + grows
        self.host_room = self.host_room - grows
        self.free_slot = None
        self.over_capacity = torch.zeros_like(self.over_capacity)
        self.seen_tokens += new
        return self.keys, self.values

    # ----- decode-time eviction ---------------------------------------------------------------------------
    def newest_position(self) -> int:
        return self.seen_tokens - 1

    def held(self) -> torch.Tensor:
        """`[segments, widest]` True on the slots each segment holds."""
        width = int(self.host_lengths.max())
        return torch.arange(width, device=self.device) < self.lengths[:, None]

    def attended_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys padded, `[b, h, widest, d]`, and which are held, `[b, h, widest]` (what a decode-time
        method's scores are computed over)."""
        held = self.held()
        index = torch.where(held, self.starts[:, None] + torch.arange(held.shape[-1], device=self.device), 0)
        shape = (self.batch, self.kv_heads, held.shape[-1])
        return self.keys[index].view(*shape, -1), held.view(shape)

    def retire(self, scores: torch.Tensor) -> None:
        """After a step, each segment holding more than its capacity frees its lowest-`scores` slot (`[b, h,
        widest]`), which the next token overwrites."""
        over = self.host_lengths > self.host_capacity
        if not bool(over.any()):
            return
        held = self.held()
        lowest = scores.reshape(held.shape).masked_fill(~held, float("inf")).argmin(dim=-1)
        self.free_slot = torch.where(over.to(self.device), lowest, -1)
        self.over_capacity = over

    # ----- masks ------------------------------------------------------------------------------------------
    def decode_mask(self, implementation: str, groups: int, query_length: int, dtype) -> RaggedSegments:
        """The segments as they will be once this step's `query_length` tokens are written (room is made now,
        so that the write does not move them)."""
        if implementation != RAGGED_ATTENTION:
            raise ValueError(f"a head-adaptive cache decodes with attn_implementation={RAGGED_ATTENTION!r}, "
                             f"not {implementation!r}")
        self.reserve(query_length)
        grows, grows_here = self._appended(query_length)
        return RaggedSegments(self.starts, self.lengths + grows_here, int((self.host_lengths + grows).max()),
                              query_length)

    # ----- sizes ------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen_tokens  # tokens seen: the models derive positions from it

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        query_length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return int(self.host_lengths.max()) + query_length, 0

    def live_tokens(self) -> torch.Tensor:
        """`[b, kv_heads]` tokens each head holds (less a freed slot), on the CPU."""
        return (self.host_lengths - self.over_capacity.long()).view(self.batch, self.kv_heads)

    @property
    def kept_tokens(self) -> int:
        """Tokens kept at prefill per KV head, the mean over heads of the sample keeping most."""
        counts = (self.kept_indices >= 0).sum(-1)
        return int(counts.sum(-1).max()) // self.kv_heads

    @property
    def nbytes(self) -> int:
        """Bytes of the stores: the tokens held and the room after each segment."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # ----- transformers' cache operations -----------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("a head-adaptive cache does not reorder its batch (beam search, batch selection, "
                                  "repeated samples): use greedy or sampled decoding")

    reorder_cache = batch_select_indices = batch_repeat_interleave = _unsupported
