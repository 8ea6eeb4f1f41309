"""The base of every eviction cache: budgets, the scoring hook, eviction and kept-index bookkeeping.

A `CompressedCache` is a `transformers.DynamicCache` whose layers shrink. Its life:

1. Prefill: the attention modules run unchanged on the full prompt. Right after each
   layer's attention (a forward hook on the module) the method scores the prompt's keys,
   the budget says how many to keep, and the layer's key/value tensors are replaced by
   gathered copies of the kept slots: the full tensors are freed, not masked.
2. Decoding: new tokens are appended. Positions stay the original ones because
   `get_seq_length()` reports tokens *seen*, which is what the models use for rotary
   phases (and Qwen2-VL for its M-RoPE offsets), while `get_mask_sizes()` reports the
   tokens *held*. A per-layer mask (a forward pre-hook) is passed to the attention only
   where some slot is not to be attended (left padding in a batch, per-sample budgets);
   otherwise none. For `vlmcompress_sdpa` it is per KV head, so no K/V is copied per query head.
3. Decode-time methods (H2O, StreamingLLM) retire the lowest-scored slot of a sample when
   it holds more than its budget, and compact the tensors; at its budget the next token is
   written into the retired slot instead (`free_slot`), which is also how static decoding
   (`make_static`) evicts.

The cache finds the model's attention modules itself: `attach(model)` (done by
`vlmcompress.load`), or, when passed as `past_key_values=` to a plain transformers model,
on the model's first forward call after the cache was made.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ..budget import validate_budget as validate_share_or_count
from ..grouped_sdpa import GROUPED_SDPA
from .attention import (
    accumulated_attention,
    attention_chunks,
    bind_attention_arguments,
    key_validity_from_mask,
    recompute_queries,
    reject_right_padding,
    slice_positions,
)

# Decoding steps one allocation of a padded layer's validity and mask buffers lasts (CompressedLayer).
ROOM = 256

# Scores at or above this are "always keep"; they are ordered among themselves by the
# offset added to it, so a budget smaller than the protected set keeps its best part.
PROTECTED = 1e12


def validate_budget(budget) -> float | int:
    """A float in (0, 1] (share of prompt tokens) or an int >= 1 (tokens per layer)."""
    return validate_share_or_count(budget, "kv_budget", "prompt tokens", "tokens kept per layer")


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (the module holding `.layers`) of a VLM or plain causal LM."""
    candidates = [
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
        getattr(model, "model", None),
        model,
    ]
    for candidate in candidates:
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate
    raise ValueError(f"{type(model).__name__} has no decoder layers that a KV cache can attach to")


CACHE_ARGUMENTS = ("cache", "past_key_values")  # a forward's KV-cache keyword: since transformers 5.24, before


def passed_cache(arguments: dict):
    """The KV cache a forward was called with: `cache=` since transformers 5.24, `past_key_values=` before."""
    new_name, old_name = CACHE_ARGUMENTS
    return arguments.get(new_name, arguments.get(old_name))


def cache_argument(model: torch.nn.Module) -> str:
    """The name `model.forward` takes its KV cache under (`cache` since transformers 5.24, which still
    accepts `past_key_values` but warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean attention mask: 0 where attending is allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def visual_token_ids(config) -> list[int]:
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


class CompressedLayer(DynamicLayer):
    """One layer's keys/values `[batch, kv_heads, slots, head_dim]` plus what eviction needs.

    positions: `[b, h, slots]` original position of each slot (None until the prompt is compressed).
    slot_valid: `[b, h, slots]` False where a slot must not be attended (left padding, a retired
        slot awaiting compaction or overwrite, static decoding's unfilled room); None when every
        slot is valid.
    kept_indices: `[b, h, kept]` the prompt positions kept at prefill, sorted.
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
        # [b, h] slot retired after the last decoding step: the next token is written into it in
        # place, so a cache at its budget neither grows nor is copied while decoding. Under static
        # decoding, a fixed buffer that each step refills (`retire_static`), and the slot is marked invalid.
        self.free_slot: torch.Tensor | None = None
        self.uniform_capacity: int | None = None  # host copy of `capacity` when equal for all rows
        # Decoding is launch-bound: a padded layer's validity and its additive mask live in buffers with
        # room for the coming tokens (valid, mask 0), so a step takes views of them and launches no kernel.
        self._validity_room: torch.Tensor | None = None  # [b, h, room] bool; slot_valid is a prefix view
        self._mask_room: torch.Tensor | None = None  # [b, h, 1, room] additive form of _validity_room
        # Static decoding (`make_static`): decoding step t writes slot `static_base + write_offset`, where
        # `write_offset` is a device scalar holding t, so a step is the same kernels on the same buffers;
        # its token's position is `static_seen_base + write_offset` (`static_position`).
        self.static_base = 0
        self.static_seen_base = 0
        self.write_offset: torch.Tensor | None = None
        self.step_slot: torch.Tensor | None = None  # `[1]`: the current step's slot (`start_static_step`)
        # [b, h, groups, 1, slots]: the additive form of slot_valid during static decoding, changed in place
        # where a step makes a slot valid (one kernel) rather than rebuilt at every step (three)
        self._static_mask: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.write_offset is not None:
            return self._write_static(key_states, value_states)
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

    def make_static(self, filled: int, room: int, write_offset: torch.Tensor) -> None:
        """Keep the first `filled` slots and preallocate `room` more, invalid until written: decoding then
        writes in place at `static_base + write_offset` (a device scalar) and never changes a shape. A layer
        that evicts while decoding (`capacity` set) ignores `filled` and `room`: `_make_static_evicting`."""
        self.static_seen_base = self.seen_tokens
        if self.capacity is not None:
            self._make_static_evicting(write_offset)
            return
        b, h, _, d = self.keys.shape
        valid = self.slot_valid[..., :filled] if self.slot_valid is not None else self.keys.new_ones(
            b, h, filled, dtype=torch.bool)
        self.keys = torch.cat([self.keys[:, :, :filled], self.keys.new_zeros(b, h, room, d)], dim=2)
        self.values = torch.cat([self.values[:, :, :filled], self.values.new_zeros(b, h, room, d)], dim=2)
        self.slot_valid = torch.cat([valid, valid.new_zeros(b, h, room)], dim=-1)
        self._validity_room = self._mask_room = self._static_mask = None
        self.static_base, self.write_offset = filled, write_offset

    def _make_static_evicting(self, write_offset: torch.Tensor) -> None:
        """Eager decoding's steady state at fixed shapes: `max(capacity) + 1` slots, each step's token written
        into `free_slot` (a fixed `[b, h]` buffer, first the slot after the prompt's), which the step's eviction
        refills in place (`retire_static`). Padding, room not yet grown into and the retired slot are invalid.
        Made once: later calls (the room of the prefill-only layers ran out) only move the position base."""
        if self.write_offset is None:
            b, h, held, _ = self.keys.shape
            # A layer holds at most its capacity after prefill; after an earlier turn it may hold more slots,
            # the extra ones invalid, which serve as empty slots.
            empty = max(1, int(self.capacity.max()) + 1 - held)
            valid = self.slot_valid
            if valid is None:
                valid = self.keys.new_ones(b, h, held, dtype=torch.bool)

            def grown(tensor):
                return torch.cat([tensor, tensor.new_zeros(b, h, empty, *tensor.shape[3:])], dim=2)

            self.keys, self.values, self.positions, self.slot_valid = map(
                grown, (self.keys, self.values, self.positions, valid))
            if self.scores is not None:
                self.scores = grown(self.scores)
            self.free_slot = torch.full((b, h), held, dtype=torch.long, device=self.keys.device)
            self._validity_room = self._mask_room = self._static_mask = None
        self.write_offset = write_offset

    def end_static(self, filled: int) -> None:
        """Back to the dynamic form after static decoding, so that a next turn can append to it: a layer that
        does not evict keeps its first `filled` slots (the room's unwritten rest goes), one that evicts keeps
        its buffers, the slot it retired last left invalid."""
        if self.free_slot is None:
            self.keys, self.values = self.keys[:, :, :filled], self.values[:, :, :filled]
            self.slot_valid = self.slot_valid[..., :filled]
        self.free_slot = None
        if bool(self.slot_valid.all()):
            self.slot_valid = None
        self._validity_room = self._mask_room = self._static_mask = None
        self.static_base, self.write_offset, self.step_slot = 0, None, None

    def undo_static_steps(self, written: int, steps: int) -> None:
        """Mask again the slots of the last `steps` of the `written` static steps (`StaticDecoding.undo_steps`)."""
        start = self.static_base + written
        self.slot_valid[..., start: start + steps] = False
        if self._static_mask is not None:
            self._static_mask[..., start: start + steps] = torch.finfo(self._static_mask.dtype).min
        self.seen_tokens -= steps

    def static_position(self) -> torch.Tensor:
        """`[1]`: the position of the token the current static decoding step writes."""
        return self.write_offset + self.static_seen_base

    def newest_position(self) -> int | torch.Tensor:
        """Position of the newest token held: a host int, or under static decoding the device scalar
        `static_position()`, since a host int would be baked into the captured step."""
        return self.static_position() if self.write_offset is not None else self.seen_tokens - 1

    def start_static_step(self, slot: torch.Tensor) -> None:
        """Before a static decoding step's attention: the slot its token is written to becomes valid (the
        token attends to itself). For a layer that does not evict that is `slot` (`[1]`, `static_base +
        write_offset`, which `CompressedCache.start_static_step` adds up for all layers at once); a slot
        chosen by eviction (`free_slot`) also takes the token's position and, for a method that accumulates
        scores, a score of zero."""
        if self.free_slot is None:
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

    def retire_static(self, scores: torch.Tensor) -> None:
        """After a static decoding step's attention, choose the slot of the next token, in place and without
        the host: a row (sample, KV head) holding more than its capacity retires its lowest-scored live slot
        (eager decoding's eviction); any other takes its first empty slot (room not yet grown into, padding)."""
        over = self.slot_valid.sum(-1) > self.capacity[:, None]  # [b, h]
        # Where over, the argmin runs over the live slots only; elsewhere it lands on an empty slot's -inf.
        empty_score = torch.where(over, float("inf"), float("-inf"))[..., None]
        choice = torch.where(self.slot_valid, scores, empty_score).argmin(dim=-1)
        # The additive mask keeps the retired slot unmasked: the next step writes its token there and
        # unmasks it anyway (an empty slot chosen here needs that) before any attention reads the mask.
        self.slot_valid.scatter_(-1, choice[..., None], False)
        self.free_slot.copy_(choice)

    def _write_static(self, key_states, value_states):
        if self.free_slot is not None:
            self._write_at_free_slot(key_states, value_states)
            return self.keys, self.values
        self.keys.index_copy_(2, self.step_slot, key_states)
        self.values.index_copy_(2, self.step_slot, value_states)
        return self.keys, self.values

    def static_decode_mask(self, dtype: torch.dtype, groups: int) -> torch.Tensor:
        """`[b, h * groups, 1, slots]` additive mask of the static buffers: 0 on filled slots (the step's own
        included, marked valid before the step), the dtype's minimum on padding and unfilled room. Built from
        `slot_valid` once per room; each step then unmasks its own slot in place."""
        mask = self._static_mask
        if mask is None or mask.dtype != dtype or mask.shape[2] != groups:
            mask = additive_mask(self.slot_valid[:, :, None, None], dtype).expand(-1, -1, groups, -1, -1)
            self._static_mask = mask = mask.contiguous()
        b, h = mask.shape[:2]
        return mask.view(b, h * groups, 1, mask.shape[-1])

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

    def get_seq_length(self) -> int:
        # Tokens seen, not held: the models derive positions (rotary phases) from it.
        return self.seen_tokens

    @property
    def held_tokens(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        query_length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.held_tokens + query_length, 0

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only `slots` `[b, h, k]` (ascending) of the stored tensors; the rest is freed."""
        index = slots[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        for name in ("positions", "slot_valid", "scores"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.gather(2, slots))

    def reset(self) -> None:
        super().reset()
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.write_offset is not None:
            raise NotImplementedError("a statically decoding cache cannot change its batch (beam search)")
        for name in ("positions", "slot_valid", "scores", "capacity", "kept_indices", "free_slot"):
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
        for name in ("positions", "slot_valid", "scores", "capacity", "kept_indices", "free_slot"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))


@dataclass
class PromptContext:
    """What a method may use to score one layer's prompt: the attention module, its inputs, the keys."""

    module: torch.nn.Module
    layer_idx: int
    num_layers: int
    hidden_states: torch.Tensor  # [b, n, hidden] the attention's input
    position_embeddings: tuple  # (cos, sin) for the n positions
    keys: torch.Tensor  # [b, h, n, d] rotated keys of the prompt
    key_valid: torch.Tensor | None  # [b, n] False on left padding; None if no padding
    visual_mask: torch.Tensor | None  # [b, n] True on visual tokens, when known
    # Budgets and lengths are host decisions (top-k widths, windows) and live on the CPU: reading them
    # off the device in every layer would make the host wait for each layer before queueing the next.
    budget: torch.Tensor  # [b] the sample's mean budget in tokens, on the CPU
    real_length: torch.Tensor  # [b] prompt length without padding, on the CPU
    _queries: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def queries(self, last: int) -> torch.Tensor:
        """Rotated queries of the last `last` prompt positions, `[b, H, last, d]`."""
        if last not in self._queries:
            index = slice(self.length - last, None)
            self._queries[last] = recompute_queries(
                self.module, self.hidden_states[:, index], slice_positions(self.position_embeddings, index)
            )
        return self._queries[last]

    def accumulated_attention(self, last: int) -> torch.Tensor:
        """Attention received by each key from the last `last` queries, `[b, h, n]` (float64)."""
        return accumulated_attention(self.queries(last), self.keys, self.module.scaling, self.key_valid,
                                     compile=True)

    def attention_chunks(self, last: int, query_valid: torch.Tensor | None = None, statistics=None):
        """`attention.attention_chunks` of the last `last` queries; `query_valid` `[b, last]` leaves some out;
        `statistics` reduces each chunk's scores instead."""
        return attention_chunks(self.queries(last), self.keys, self.module.scaling, self.key_valid,
                                query_valid=query_valid, statistics=statistics)


@dataclass
class DecodeContext:
    """One decoding forward of one layer: the new tokens' hidden states against the held keys."""

    module: torch.nn.Module
    layer: CompressedLayer
    hidden_states: torch.Tensor  # [b, q, hidden]
    position_embeddings: tuple

    def accumulated_attention(self) -> torch.Tensor:
        # One new token sees every valid slot, wherever it was written (`attention_chunks` masks causally
        # only among several new tokens, which are appended last).
        queries = recompute_queries(self.module, self.hidden_states, self.position_embeddings)
        return accumulated_attention(queries, self.layer.keys, self.module.scaling, self.layer.slot_valid)


def integer_allocation(weights: list[float], total: int, upper: int, lower: int = 0) -> list[int]:
    """Integers in [lower, upper], proportional to `weights`, summing exactly to `total`.

    Shares above `upper` are clipped and their excess redistributed over the others in
    proportion to their weights (water-filling); the rounding goes by largest remainder.
    """
    count = len(weights)
    if not lower * count <= total <= upper * count:
        raise ValueError(f"cannot split {total} tokens over {count} layers within [{lower}, {upper}] each")
    spare = total - lower * count
    room = upper - lower
    weights = [max(0.0, float(w)) for w in weights]
    if sum(weights) == 0:
        weights = [1.0] * count
    shares = [0.0] * count
    free = list(range(count))
    while free:
        mass = sum(weights[i] for i in free)
        left = spare - sum(shares[i] for i in range(count) if i not in free)
        proposal = {i: (left * weights[i] / mass if mass > 0 else left / len(free)) for i in free}
        clipped = [i for i in free if proposal[i] > room]
        if not clipped:
            for i in free:
                shares[i] = proposal[i]
            break
        for i in clipped:
            shares[i] = room
        free = [i for i in free if i not in clipped]
    counts = [min(room, math.floor(s + 1e-9)) for s in shares]
    remainder = spare - sum(counts)
    order = sorted(range(count), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order:
        if remainder == 0:
            break
        if counts[i] < room:
            counts[i] += 1
            remainder -= 1
    return [lower + c for c in counts]


class CompressedCache(DynamicCache):
    """Base of the eviction caches. Subclasses define `score()` and, optionally, a layer allocation.

    budget: float in (0, 1], the share of each prompt's tokens kept (mean over layers), or
    int >= 1, tokens kept per layer (mean over layers). A budget that covers the prompt keeps it whole.
    """

    name: ClassVar[str] = ""
    #: retires slots during decoding to stay at the budget (H2O, StreamingLLM)
    evicts_during_decoding: ClassVar[bool] = False
    #: the per-layer budgets depend on every layer's statistics, so eviction waits for the last layer
    allocation_needs_all_layers: ClassVar[bool] = False

    def __init__(self, budget: float | int = 0.1):
        Cache.__init__(self, layer_class_to_replicate=CompressedLayer)
        self.budget = validate_budget(budget)
        self.visual_mask: torch.Tensor | None = None
        self.num_layers: int | None = None
        self._visual_ids: list[int] = []
        self._pending: dict[int, tuple[CompressedLayer, PromptContext, torch.Tensor]] = {}
        self._handles: list = []
        # Hooks only prefill needs, or only batches with padding need: dropped once the prompt is
        # compressed, so that decoding runs the attention modules without Python hooks.
        self._prefill_handles: list = []
        self._mask_handles: list = []
        self._attached_to = None
        self.prefill_nbytes: int | None = None  # bytes held right after the prompt was compressed
        self.prompt_padded = False  # some prompt of the batch was left-padded
        self._prompt_validity_memo = None  # (weakref to the prompt's mask, (b, n), key_valid, real lengths)
        self.static_decoding = None  # the StaticDecoding driving this cache's decoding steps, during its generate
        self._static_bases: torch.Tensor | None = None  # [layers] each layer's static_base, on the device
        discovery = torch.nn.modules.module.register_module_forward_pre_hook(partial(_discover, weakref.ref(self)))
        self._handles.append(discovery)
        for handles in (self._handles, self._prefill_handles, self._mask_handles):
            weakref.finalize(self, _remove_all, handles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"

    # ----- what a method defines -------------------------------------------------------------
    def score(self, ctx: PromptContext) -> torch.Tensor:
        """Importance of each prompt key, `[b, kv_heads, n]` (float64); higher is kept first."""
        raise NotImplementedError

    def layer_budgets(self, ctx: PromptContext) -> torch.Tensor:
        """Tokens to keep in `ctx.layer_idx` per sample, `[b]` on the CPU. Default: the mean budget everywhere."""
        return ctx.budget

    def allocate_all_layers(self, contexts: list[PromptContext]) -> list[torch.Tensor]:
        """Per-layer budgets when `allocation_needs_all_layers`: a list over layers of `[b]` on the CPU."""
        raise NotImplementedError

    def decode_scores(self, ctx: DecodeContext) -> torch.Tensor:
        """For decode-time methods: scores of the held slots `[b, h, slots]` after this step."""
        raise NotImplementedError

    def decode_capacity(self, layer_budget: torch.Tensor) -> torch.Tensor | None:
        """Slots a sample may hold while decoding: its prefill budget (an int budget as given, even
        above the prompt length); None, never evict, for a budget of 1.0."""
        if isinstance(self.budget, float):
            return None if self.budget >= 1.0 else layer_budget
        return torch.full_like(layer_budget, self.budget)

    # ----- budgets --------------------------------------------------------------------------
    def budget_tokens(self, real_length: torch.Tensor) -> torch.Tensor:
        """The mean number of tokens kept per layer for prompts of `real_length` `[b]` tokens."""
        if isinstance(self.budget, float):
            kept = torch.floor(real_length.double() * self.budget + 0.5).long()
            # a share is checked here, where the prompt length that turns it into tokens is known
            starved = (kept < 1) & (real_length > 0)
            if starved.any():
                shortest = int(real_length[starved].min())
                raise ValueError(
                    f"kv_budget={self.budget} keeps no token of a {shortest}-token prompt: use a share of at "
                    f"least {1 / shortest:.3g} or an int budget (kv_budget=1 keeps one token per layer)"
                )
        else:
            kept = torch.full_like(real_length, self.budget)
        return torch.minimum(kept, real_length)

    # ----- attachment -----------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> "CompressedCache":
        """Hook this cache into `model`'s attention modules (idempotent)."""
        if self._attached_to is not None and self._attached_to() is model:
            return self
        decoder = language_model_of(model)
        self.detach()
        self.num_layers = len(decoder.layers)
        self._visual_ids = visual_token_ids(model.config)
        ref = weakref.ref(self)
        post = self._handles if self.evicts_during_decoding else self._prefill_handles
        self._register_mask_hooks(decoder)
        for decoder_layer in decoder.layers:
            hook = partial(_attention_post_hook, ref)
            post.append(decoder_layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        embeddings = model.get_input_embeddings()
        self._prefill_handles.append(embeddings.register_forward_pre_hook(partial(_embedding_pre_hook, ref)))
        self._attached_to = weakref.ref(model)
        return self

    def _register_mask_hooks(self, decoder: torch.nn.Module) -> None:
        ref = weakref.ref(self)
        for decoder_layer in decoder.layers:
            self._mask_handles.append(
                decoder_layer.self_attn.register_forward_pre_hook(partial(_attention_pre_hook, ref), with_kwargs=True)
            )

    def make_static(self, room: int, write_offset: torch.Tensor, steps_written: int = 0) -> None:
        """Give every compressed layer `room` preallocated slots for decoding (`CompressedLayer.make_static`);
        a cache already static keeps the `steps_written` tokens it wrote since. A layer that evicts while
        decoding gets its capacity and one slot more instead. The unfilled room is masked at every step, so
        the mask hooks come back."""
        for layer in self.layers:
            filled = layer.static_base + steps_written if layer.write_offset is not None else layer.held_tokens
            layer.make_static(filled, room, write_offset)
        self._static_bases = torch.tensor([layer.static_base for layer in self.layers], device=write_offset.device)
        if not self._mask_handles:
            self._register_mask_hooks(language_model_of(self._attached_to()))

    def start_static_step(self) -> None:
        """Before each static decoding step's attention, every layer's `start_static_step`, with the step's
        slots (`static_base + write_offset`) added up for all layers in one kernel."""
        slots = self._static_bases + self.layers[0].write_offset
        for index, layer in enumerate(self.layers):
            layer.start_static_step(slots[index: index + 1])

    def end_static(self, steps_written: int) -> None:
        """After a `generate` decoded statically: every layer back to its dynamic form (`CompressedLayer.end_static`),
        keeping the `steps_written` tokens written since its room was last made."""
        for layer in self.layers:
            if layer.write_offset is not None:
                layer.end_static(layer.static_base + steps_written)

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can undo decoding steps: only static decoding without decode-time eviction can."""
        return self.static_decoding is not None and not self.evicts_during_decoding

    def crop(self, tokens_to_remove: int) -> None:
        """Undo the last `-tokens_to_remove` decoding steps (a no-op for 0, which transformers' deferred stop
        check asks every step); only under static decoding (`StaticDecoding.undo_steps`)."""
        if tokens_to_remove == 0:
            return
        if tokens_to_remove > 0 or not self.is_croppable:
            raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")
        self.static_decoding.undo_steps(-tokens_to_remove)

    def detach(self) -> None:
        for handles in (self._handles, self._prefill_handles, self._mask_handles):
            _remove_all(handles)
        self._attached_to = None

    def _prompt_compressed(self) -> None:
        """Every layer holds its compressed prompt: drop the hooks decoding does not need."""
        self.prefill_nbytes = self.nbytes()
        _remove_all(self._prefill_handles)
        # A padded prompt needs the mask hooks even where eviction dropped every padding slot: they pass no
        # mask, where the model would apply its 2-D padding mask to slots that now hold kept tokens.
        if not self.prompt_padded and all(layer.slot_valid is None for layer in self.layers):
            _remove_all(self._mask_handles)

    # ----- bookkeeping ----------------------------------------------------------------------
    @property
    def kept_indices(self) -> list[torch.Tensor]:
        return [layer.kept_indices for layer in self.layers]

    def kept_counts(self) -> list[torch.Tensor]:
        """Live slots per layer, `[b, kv_heads]` each: held, less padding and the retired slot the
        next token will overwrite (invalid in `slot_valid` where there is one)."""
        counts = []
        for layer in self.layers:
            b, h, held = layer.keys.shape[:3]
            if layer.slot_valid is None:
                count = torch.full((b, h), held - (1 if layer.free_slot is not None else 0), dtype=torch.long)
            else:
                count = layer.slot_valid.sum(-1).cpu()
            counts.append(count)
        return counts

    def nbytes(self) -> int:
        """Bytes of key/value tensors held across all layers."""
        return sum(layer.nbytes for layer in self.layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if layer.seen_tokens > 0 and not layer.compressed and layer_idx not in self._pending:
                raise RuntimeError(
                    f"{type(self).__name__} received a second forward without having compressed the prompt: "
                    "it is not hooked into this model's attention. Call `cache.attach(model)` before "
                    "`model.generate(..., past_key_values=cache)` (vlmcompress.load does this for you)."
                )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ----- prefill --------------------------------------------------------------------------
    def _on_prompt(self, module, layer: CompressedLayer, arguments: dict) -> None:
        hidden = arguments["hidden_states"]
        batch = hidden.shape[0]
        keys = layer.keys
        n = keys.shape[-2]
        key_valid, real = self._prompt_validity(arguments.get("attention_mask"), batch, n, keys.device)
        self.prompt_padded = self.prompt_padded or key_valid is not None
        visual = self.visual_mask
        if visual is not None and visual.shape != (batch, n):
            visual = None
        ctx = PromptContext(
            module=module,
            layer_idx=module.layer_idx,
            num_layers=self.num_layers or module.config.num_hidden_layers,
            hidden_states=hidden,
            position_embeddings=arguments["position_embeddings"],
            keys=keys,
            key_valid=key_valid,
            visual_mask=visual.to(keys.device) if visual is not None else None,
            budget=self.budget_tokens(real),
            real_length=real,
        )
        scores = self.score(ctx)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None], float("-inf"))
        if not self.allocation_needs_all_layers:
            self._evict_prompt(layer, ctx, scores, self.layer_budgets(ctx))
            return
        # Waiting for the other layers' statistics: keep what eviction needs, not the activations.
        ctx.hidden_states, ctx.position_embeddings, ctx._queries = None, None, {}
        self._pending[ctx.layer_idx] = (layer, ctx, scores)
        if len(self._pending) == ctx.num_layers:
            pending = [self._pending[i] for i in sorted(self._pending)]
            budgets = self.allocate_all_layers([c for _, c, _ in pending])
            for (pending_layer, pending_ctx, pending_scores), budget in zip(pending, budgets):
                self._evict_prompt(pending_layer, pending_ctx, pending_scores, budget)
            self._pending.clear()

    def _prompt_validity(self, attention_mask, batch: int, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`key_validity_from_mask` and the real prompt lengths `[b]` (on the CPU), read once per prompt mask
        rather than in every layer: each read waits for the device."""
        if not isinstance(attention_mask, torch.Tensor):
            return None, torch.full((batch,), n)
        memo = self._prompt_validity_memo
        if memo is None or memo[0]() is not attention_mask or memo[1] != (batch, n):
            key_valid = key_validity_from_mask(attention_mask, batch, n, device)
            if key_valid is not None:
                reject_right_padding(key_valid)
            real = key_valid.sum(-1).cpu() if key_valid is not None else torch.full((batch,), n)
            memo = self._prompt_validity_memo = (weakref.ref(attention_mask), (batch, n), key_valid, real)
        key_valid, real = memo[2], memo[3]
        return (key_valid.to(device) if key_valid is not None else None), real

    def _evict_prompt(self, layer: CompressedLayer, ctx: PromptContext, scores: torch.Tensor, kept: torch.Tensor):
        """Keep the top-`kept[b]` (on the CPU) scored keys of each sample and KV head; free the rest."""
        width = int(kept.max())
        ranked = scores.topk(width, dim=-1).indices  # [b, h, width], best first
        slots, order = ranked.sort(dim=-1)
        if ctx.key_valid is None and bool((kept == width).all()):
            valid = None  # every kept slot is a real token: known without reading the device
        else:
            kept_here = kept.to(scores.device, non_blocking=True)
            within_budget = (torch.arange(width, device=scores.device) < kept_here[:, None, None]).expand_as(ranked)
            valid = within_budget.gather(-1, order)
            if ctx.key_valid is not None:
                valid &= ctx.key_valid[:, None].expand_as(scores).gather(-1, slots)
        layer.positions = torch.arange(ctx.length, device=slots.device).expand_as(scores)
        layer.slot_valid = None
        layer.scores = self._initial_decode_scores(ctx, scores)
        if width < ctx.length:
            layer.keep(slots)
        else:  # every slot is kept (slots are 0..n-1): gathering would copy the whole cache for nothing
            layer.positions = layer.positions.contiguous()  # decode-time eviction writes into it
        layer.slot_valid = None if valid is None or bool(valid.all()) else valid
        layer.kept_indices = slots
        layer.compressed = True
        if ctx.layer_idx == ctx.num_layers - 1:
            self._prompt_compressed()
        if self.evicts_during_decoding:
            capacity = self.decode_capacity(kept)
            if capacity is not None and bool((capacity == capacity[0]).all()):
                layer.uniform_capacity = int(capacity[0])
            layer.capacity = capacity.to(scores.device, non_blocking=True) if capacity is not None else None
        else:
            layer.positions = None  # only decode-time eviction needs to know where each slot came from

    def _initial_decode_scores(self, ctx: PromptContext, scores: torch.Tensor) -> torch.Tensor | None:
        """Running scores carried into decoding (H2O's accumulated attention); None by default."""
        return None

    # ----- decoding -------------------------------------------------------------------------
    def _on_decode(self, module, layer: CompressedLayer, arguments: dict) -> None:
        if not self.evicts_during_decoding or layer.capacity is None:
            return
        ctx = DecodeContext(module, layer, arguments["hidden_states"], arguments["position_embeddings"])
        scores = self.decode_scores(ctx)
        if layer.write_offset is not None:
            layer.retire_static(scores)
            return
        steady = layer.slot_valid is None and layer.uniform_capacity is not None
        if steady and layer.held_tokens <= layer.uniform_capacity:
            return  # still under budget
        if steady and layer.held_tokens == layer.uniform_capacity + 1:
            # Every row is one over its budget: retire its lowest-scored slot and let the next token
            # take that slot, with no copy of the cache and no device-to-host synchronisation.
            layer.free_slot = scores.argmin(dim=-1)
            return
        valid = layer.slot_valid
        if valid is None:
            valid = torch.ones_like(scores, dtype=torch.bool)
        over = (valid.sum(-1) - layer.capacity.to(valid.device)[:, None]).clamp(min=0)  # [b, h]
        if bool(over.any()):
            ascending = scores.masked_fill(~valid, float("inf")).argsort(dim=-1)
            rank = torch.empty_like(ascending)
            rank.scatter_(-1, ascending, torch.arange(ascending.shape[-1], device=rank.device).expand_as(rank))
            valid = valid & ~(rank < over[..., None])
        invalid = ~valid
        removable = int(invalid.sum(-1).min())
        layer.slot_valid = valid
        if removable > 0:
            drop = invalid & (invalid.cumsum(-1) <= removable)
            survivors = (~drop).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
            layer.keep(survivors[..., : valid.shape[-1] - removable])
        if bool(layer.slot_valid.all()):
            layer.slot_valid = None

    def decode_attention_mask(self, module, layer: CompressedLayer, query_length: int, dtype):
        """The mask one decoding forward of `layer` needs, in the form its attention expects: per KV head
        (boolean) for `GROUPED_SDPA`, which then needs no `repeat_kv`; per query head (additive) for other
        SDPA or eager attention; the 2-D padding mask for flash-attention."""
        valid = layer.slot_valid
        if valid is None and query_length == 1:
            return None
        implementation = getattr(module.config, "_attn_implementation", "sdpa") or "sdpa"
        if layer.write_offset is not None:
            if "flash" in implementation:
                raise NotImplementedError(
                    f"static decoding (cuda_graphs=True) masks the cache's unfilled room, which {implementation} "
                    f"cannot take: load with attn_implementation={GROUPED_SDPA!r} or 'sdpa'")
            groups = 1 if implementation == GROUPED_SDPA else getattr(module, "num_key_value_groups", 1)
            return layer.static_decode_mask(dtype, groups)
        if query_length == 1 and implementation == GROUPED_SDPA:
            return layer.additive_decode_mask(dtype)
        batch, kv_heads, held = layer.keys.shape[:3]
        device = layer.keys.device
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
        allowed = allowed.repeat_interleave(getattr(module, "num_key_value_groups", 1), dim=1)
        return additive_mask(allowed, dtype)


# ----- hooks (module-level so that they hold the cache only weakly) ---------------------------
def _remove_all(handles: list) -> None:
    while handles:
        handles.pop().remove()


def _discover(ref, module, args):
    cache = ref()
    if cache is None or cache._attached_to is not None:
        return None
    if isinstance(module, PreTrainedModel):
        try:
            cache.attach(module)
        except ValueError:
            return None
    return None


def _embedding_pre_hook(ref, module, args):
    cache = ref()
    if cache is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 2:
        return None
    if cache.layers and cache.layers[0].seen_tokens > 0:
        return None  # decoding: the prompt's modality map is already known
    if cache._visual_ids:
        ids = torch.tensor(cache._visual_ids, device=args[0].device)
        cache.visual_mask = torch.isin(args[0], ids)
    return None


def _attention_pre_hook(ref, module, args, kwargs):
    cache = ref()
    if cache is None or passed_cache(kwargs) is not cache:
        return None
    if module.layer_idx >= len(cache.layers) or not cache.layers[module.layer_idx].compressed:
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer = cache.layers[module.layer_idx]
    kwargs["attention_mask"] = cache.decode_attention_mask(module, layer, hidden.shape[1], hidden.dtype)
    return args, kwargs


def _attention_post_hook(ref, module, args, kwargs, output):
    cache = ref()
    if cache is None:
        return None
    arguments = kwargs if passed_cache(kwargs) is not None else bind_attention_arguments(module, args, kwargs)
    if passed_cache(arguments) is not cache:
        return None
    if "hidden_states" not in arguments:
        arguments = bind_attention_arguments(module, args, kwargs)
    layer = cache.layers[module.layer_idx]
    if layer.compressed:
        cache._on_decode(module, layer, arguments)
    elif module.layer_idx not in cache._pending:
        cache._on_prompt(module, layer, arguments)
    return None
