"""The one eviction cache: budgets, the scoring hook, eviction and kept-index bookkeeping, for any policy.

A `CompressedCache` is a `transformers.DynamicCache` whose layers shrink, driven by a method's `Policy` (what
to keep) and an allocation (how many per layer). Its life:

1. Prefill: the attention modules run unchanged on the full prompt. Right after each
   layer's attention (a forward hook on the module) the method scores the prompt's keys,
   the budget says how many to keep, and the layer's key/value tensors are replaced by
   gathered copies of the kept slots (with a merging strategy, `merge=`, the evicted entries
   merged into them first): the full tensors are freed, not masked.
2. Decoding: new tokens are appended. Positions stay the original ones because
   `get_seq_length()` reports tokens *seen*, which is what the models use for rotary
   phases (and Qwen2-VL for its M-RoPE offsets), while `get_mask_sizes()` reports the
   tokens *held*. A per-layer mask (a forward pre-hook) is passed to the attention only
   where some slot is not to be attended (left padding in a batch, per-sample budgets);
   otherwise none. For `vlmcompress_sdpa` it is per KV head, so no K/V is copied per query head.
3. Decode-time methods (H2O, StreamingLLM) retire the lowest-scored slot of a sample when
   it holds more than its budget, and compact the tensors; at its budget the next token is
   written into the retired slot instead (`CompressedLayer.retire`).

Static decoding (`vlmcompress.decoding`) replaces the layers by static ones for the length of a
`generate`; the cache's hooks call whatever layer they find.

The cache finds the model's attention modules itself: `attach(model)` (done by
`vlmcompress.load`), or, when passed as `past_key_values=` to a plain transformers model,
on the model's first forward call after the cache was made.
"""

from __future__ import annotations

import weakref
from dataclasses import fields
from functools import partial
from typing import ClassVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..budget import validate_budget as validate_share_or_count
from ..decoding.ragged_attention import RAGGED_ATTENTION
from ..glue import language_model_of, reject_right_padding, visual_token_ids
from ..scoring import key_validity_from_mask
from . import hooks
from .allocation import Uniform
from .context import DecodeContext, PromptContext
from .head_adaptive import HeadAdaptive
from .layer import CompressedLayer
from .merge import Merge, resolve_merge
from .policy import Policy, Scores
from .ragged_layer import RaggedLayer


def validate_budget(budget) -> float | int:
    """A float in (0, 1] (share of prompt tokens) or an int >= 1 (tokens per layer)."""
    return validate_share_or_count(budget, "kv_budget", "prompt tokens", "tokens kept per layer")


class CompressedCache(DynamicCache):
    """The eviction cache. A method's cache class names its `policy_class` and, where not uniform, its
    `allocation_class`; the options of both are its keyword options (`SnapKVCache(budget=0.1, window_size=32)`).
    Any policy and allocation also compose directly: `CompressedCache(0.1, policy=SnapKV(), allocation=Pyramid())`.
    `merge=` (a `cache.merge` strategy or its name; the class's `merge_default` if not given) merges the evicted
    entries into the kept ones.
    How a layer's tokens are split over its KV heads is `HeadAdaptive`'s (`head_adaptive=True`: AdaKV's split,
    stored ragged in a `RaggedLayer`), an option of every method whose scores differ by head.

    budget: float in (0, 1], the share of each prompt's tokens kept (mean over layers), or
    int >= 1, tokens kept per layer (mean over layers). A budget that covers the prompt keeps it whole.
    """

    name: ClassVar[str] = ""
    policy_class: ClassVar[type[Policy] | None] = None
    allocation_class: ClassVar[type] = Uniform
    merge_default: ClassVar[str | None] = None  # the merging strategy when `merge=` is not given

    def __init__(self, budget: float | int = 0.1, *, policy: Policy | None = None, allocation=None,
                 heads: HeadAdaptive | None = None, **options):
        self.budget, self.policy, self.allocation, self.merge, self.heads = self.validate(
            budget, policy=policy, allocation=allocation, heads=heads, **options)
        Cache.__init__(self, layer_class_to_replicate=CompressedLayer)
        self.evicts_during_decoding = self.policy.evicts_during_decoding  # read at every eager decoding step
        self.visual_mask: torch.Tensor | None = None
        self.num_layers: int | None = None
        self._visual_ids: list[int] = []
        self._pending: dict[int, tuple[CompressedLayer, PromptContext, Scores]] = {}  # layers awaiting allocation
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
        self._memo: dict = {}  # what a policy computes once per prompt (`PromptContext.memo`)
        discovery = torch.nn.modules.module.register_module_forward_pre_hook(partial(hooks.discover, weakref.ref(self)))
        self._handles.append(discovery)
        for handles in (self._handles, self._prefill_handles, self._mask_handles):
            weakref.finalize(self, hooks.remove_all, handles)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(budget={self.budget}, policy={self.policy!r}, allocation={self.allocation!r}, "
                f"merge={self.merge!r}, heads={self.heads!r})")

    @classmethod
    def option_names(cls) -> set[str]:
        """The keyword options: the fields of the policy, the allocation and the split over heads, and `merge`."""
        parts = (cls.policy_class, cls.allocation_class, HeadAdaptive)
        return {option.name for part in parts if part for option in fields(part)} | {"merge"}

    @classmethod
    def validate(cls, budget: float | int = 0.1, policy: Policy | None = None, allocation=None,
                 heads: HeadAdaptive | None = None,
                 **options) -> tuple[float | int, Policy, object, Merge | None, HeadAdaptive]:
        """The budget, policy, allocation, merging strategy and split over heads, checked (and built from
        `options`) as the constructor does, without making a cache; a `ValueError` naming the valid values
        otherwise."""
        merge = resolve_merge(options.pop("merge", cls.merge_default))
        parts = {"policy": (policy, cls.policy_class), "allocation": (allocation, cls.allocation_class),
                 "heads": (heads, HeadAdaptive)}
        built, valid = {}, {"merge"}
        for role, (given, part_class) in parts.items():
            names = {option.name for option in fields(part_class)} if given is None and part_class else set()
            valid |= names
            if given is None and part_class is None:
                raise ValueError(f"{cls.__name__} has no policy of its own: pass policy=")
            built[role] = given if given is not None else part_class(
                **{name: value for name, value in options.items() if name in names})
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for kv={cls.name or cls.__name__!r}; valid options: "
                             f"{sorted(valid)}")
        if built["heads"].head_adaptive and not built["policy"].adapts_over_heads:
            # the registry, complete once the package is imported
            from . import KV_METHODS

            takers = sorted(name for name, method in KV_METHODS.items()
                            if method.policy_class and method.policy_class.adapts_over_heads)
            raise ValueError(f"head_adaptive=True splits a layer's budget over its KV heads by their scores; "
                             f"kv={cls.name or cls.__name__!r} keeps by recency alone, the same positions in every "
                             f"head. Methods that take it: {takers}")
        return validate_budget(budget), built["policy"], built["allocation"], merge, built["heads"]

    # ----- budgets --------------------------------------------------------------------------
    def decode_capacity(self, layer_budget: torch.Tensor) -> torch.Tensor | None:
        """Slots a sample may hold while decoding: its prefill budget (an int budget as given, even
        above the prompt length); None, never evict, for a budget of 1.0."""
        if isinstance(self.budget, float):
            return None if self.budget >= 1.0 else layer_budget
        return torch.full_like(layer_budget, self.budget)

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
            hook = partial(hooks.attention_post_hook, ref)
            post.append(decoder_layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        embeddings = model.get_input_embeddings()
        self._prefill_handles.append(embeddings.register_forward_pre_hook(partial(hooks.embedding_pre_hook, ref)))
        self._attached_to = weakref.ref(model)
        return self

    def _register_mask_hooks(self, decoder: torch.nn.Module) -> None:
        ref = weakref.ref(self)
        for decoder_layer in decoder.layers:
            self._mask_handles.append(
                decoder_layer.self_attn.register_forward_pre_hook(partial(hooks.attention_pre_hook, ref),
                                                                  with_kwargs=True)
            )

    def keep_mask_hooks(self) -> None:
        """Hook the mask back in where `_prompt_compressed` dropped it (static decoding masks its unfilled room)."""
        if not self._mask_handles:
            self._register_mask_hooks(language_model_of(self._attached_to()))

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
            hooks.remove_all(handles)
        self._attached_to = None

    def _prompt_compressed(self) -> None:
        """Every layer holds its compressed prompt: drop the hooks decoding does not need."""
        self.prefill_nbytes = self.nbytes()
        hooks.remove_all(self._prefill_handles)
        # A padded prompt needs the mask hooks even where eviction dropped every padding slot: they pass no
        # mask, where the model would apply its 2-D padding mask to slots that now hold kept tokens.
        if not self.prompt_padded and not any(layer.needs_decode_mask for layer in self.layers):
            hooks.remove_all(self._mask_handles)

    # ----- bookkeeping ----------------------------------------------------------------------
    @property
    def kept_indices(self) -> list[torch.Tensor]:
        return [layer.kept_indices for layer in self.layers]

    def kept_counts(self) -> list[torch.Tensor]:
        """Live slots per layer, `[b, kv_heads]` each: held, less padding and the retired slot the
        next token will overwrite (invalid in `slot_valid` where there is one)."""
        return [layer.live_tokens() for layer in self.layers]

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
            memo=self._memo,
        )
        scores = self.policy.score(ctx)
        scores = scores if isinstance(scores, Scores) else Scores(scores)
        if key_valid is not None:
            scores.ranking = scores.ranking.masked_fill(~key_valid[:, None], float("-inf"))
        if not self.allocation.needs_all_layers:
            self._evict_prompt(layer, ctx, scores, self.allocation.layer_budgets(self.policy, ctx))
            return
        # Waiting for the other layers' statistics: keep what eviction needs, not the activations.
        ctx.hidden_states, ctx.position_embeddings, ctx._queries = None, None, {}
        self._pending[ctx.layer_idx] = (layer, ctx, scores)
        if len(self._pending) == ctx.num_layers:
            pending = [self._pending[i] for i in sorted(self._pending)]
            budgets = self.allocation.allocate_all_layers([c for _, c, _ in pending], [s for _, _, s in pending])
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

    def _evict_prompt(self, layer: CompressedLayer, ctx: PromptContext, scored: Scores, kept: torch.Tensor):
        """Keep the top-`kept[b]` (on the CPU) ranked keys of each sample and KV head; free the rest."""
        if self.heads.head_adaptive:
            self._evict_prompt_per_head(layer, ctx, scored, kept)
            return
        scores = scored.ranking
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
        layer.scores = scored.running
        full = layer.keys, layer.values
        if width < ctx.length:
            layer.keep(slots)
        else:  # every slot is kept (slots are 0..n-1): gathering would copy the whole cache for nothing
            layer.positions = layer.positions.contiguous()  # decode-time eviction writes into it
        if self.merge is not None and (width < ctx.length or valid is not None):
            layer.keys, layer.values = self.merge(*full, slots, layer.keys, layer.values, valid, ctx.key_valid)
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

    def _evict_prompt_per_head(self, layer: CompressedLayer, ctx: PromptContext, scored: Scores, kept: torch.Tensor):
        """Head-adaptive budgets: h x `kept[b]` tokens of each sample split over its KV heads by `self.heads`;
        the layer becomes a `RaggedLayer` holding just those."""
        implementation = getattr(ctx.module.config, "_attn_implementation", None)
        if implementation != RAGGED_ATTENTION:
            raise ValueError(
                f"head_adaptive=True keeps a different number of tokens in each KV head, which only "
                f"attn_implementation={RAGGED_ATTENTION!r} decodes (this model uses {implementation!r}): "
                f"vlmcompress.load(..., head_adaptive=True) picks it; for a plain transformers model pass "
                f"attn_implementation={{'text_config': {RAGGED_ATTENTION!r}}} to from_pretrained")
        selected = self.heads.select(scored.ranking, kept)
        ragged = self.layers[ctx.layer_idx] = RaggedLayer.from_selection(
            layer.keys, layer.values, selected, layer.seen_tokens, self.merge, ctx.key_valid)
        capacity = self.decode_capacity(kept) if self.evicts_during_decoding else None
        if capacity is not None:  # each head keeps its own count (and an int budget's room above the prompt)
            ragged.evict_while_decoding(scored.running, capacity, capacity - kept)
        if ctx.layer_idx == ctx.num_layers - 1:
            self._prompt_compressed()

    # ----- decoding -------------------------------------------------------------------------
    def _on_decode(self, module, layer: CompressedLayer, arguments: dict) -> None:
        if not self.evicts_during_decoding or layer.capacity is None:
            return
        ctx = DecodeContext(module, layer, arguments["hidden_states"], arguments["position_embeddings"])
        layer.retire(self.policy.decode_scores(ctx))

    def decode_attention_mask(self, module, layer: CompressedLayer, query_length: int, dtype):
        """The mask one decoding forward of `layer` needs, in the form `module`'s attention expects
        (`CompressedLayer.decode_mask`); None where every held slot is attended."""
        implementation = getattr(module.config, "_attn_implementation", "sdpa") or "sdpa"
        return layer.decode_mask(implementation, getattr(module, "num_key_value_groups", 1), query_length, dtype)
