"""The visual-token pruning points shared by every forked architecture.

Visual tokens really leave the sequence: the language model runs on a shorter prompt (hidden states,
position ids / rotary phases, attention mask and the KV cache of the affected layers all shrink), it is not
masked. Survivors keep their *original* positions (1-D, or Qwen2-VL's 3-D M-RoPE positions), so decoding
continues at the positions `generate` counts, and the cache stays consistent whatever eviction cache runs.

Two points, both forward hooks on upstream modules (no upstream method is copied); this module holds the hooks
and the prompt's state, `pruning_selection` what stays, `pruning_layout` the pruned sequence's layout, and each
architecture's `VisionAdapter` where its visual tokens come from:

- projector side (VisionZip, PruMerge, PruMerge+): a hook on the vision encoder's feature layer captures
  that layer's attention scores and keys (recomputed from its inputs); the architecture's adapter maps them
  to the tokens the projector emits (through anyres packing, pooling, pixel shuffle or 2x2 merging). A
  forward pre-hook on the language model then selects, merges and gathers the prompt before layer 0.
- inside the language model (FastV, layer K): a hook on layer K-1's attention scores the prompt with the
  last token's attention; forward pre-hooks on layers >= K gather the sequence and give those layers a mask
  of the pruned layout, during prefill and decoding.

A prompt with no visual token is left alone (documented no-op), as is a budget that keeps every token.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

from ..glue import CACHE_ARGUMENTS, bind_attention_arguments, language_model_of, passed_cache, visual_token_ids
from ..pruning import get_method
from ..pruning.scores import last_token_attention, vision_scores
from .pruning_layout import attention_mask_for, gather_sequence, left_padded_layout
from .pruning_selection import segments_of, select_fastv, select_projector
from .vision_adapter import VisionAdapter


# ----- per-prompt state ---------------------------------------------------------------------------------
@dataclass
class PromptState:
    input_ids: torch.Tensor
    inputs: dict
    visual: torch.Tensor  # [b, L]
    protected: torch.Tensor  # [b, L]
    phase: str = "prefill"
    mask2d: torch.Tensor | None = None  # the 2-D mask `generate` passes this step
    index: torch.Tensor | None = None  # [b, L'] gather index of the pruned layout (None: nothing pruned)
    valid: torch.Tensor | None = None  # [b, L'] real slots of the pruned layout
    stats: dict = field(default_factory=dict)


class PruningRuntime:
    """Holds the hooks of one model and the state of the prompt being processed."""

    def __init__(self, model, adapter: VisionAdapter):
        self._model = weakref.ref(model)
        self.adapter = adapter
        self.settings = None
        self.handles: list = []
        self.state: PromptState | None = None
        self.last_stats: dict | None = None
        self.calls: dict[str, tuple[dict, list]] = {}  # modality -> (inputs, records) of the last vision calls
        self.current: list | None = None  # the records list of the vision call running now

    @property
    def model(self):
        return self._model()

    # ----- configuration ------------------------------------------------------------------------------
    def configure(self, settings) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.state = None
        self.calls = {}
        self.settings = settings
        model = self.model
        inner = model.model
        for modality in ("image", "video"):
            name = f"get_{modality}_features"
            if name in vars(inner):
                delattr(inner, name)  # our wrapper from a previous configuration
        if settings is None:
            return
        for modality in ("image", "video"):
            original = getattr(inner, f"get_{modality}_features", None)
            if original is not None:
                setattr(inner, f"get_{modality}_features", _recording(weakref.ref(self), modality, original))
        self.spec = get_method(settings.method)
        self.budget = settings.budget if settings.budget is not None else self.spec.default_budget
        self.options = self.spec.resolve_options(dict(settings.options))
        decoder = language_model_of(model)
        self.text_config = decoder.config
        ref = weakref.ref(self)
        if self.spec.stage == "llm":
            layers = len(decoder.layers)
            k = self.options["layer"]
            if not 1 <= k < layers:
                self.settings = None
                raise ValueError(
                    f"fastv layer={k} is out of range: the language model has {layers} layers, "
                    f"so K must be in [1, {layers - 1}]"
                )
            attention = decoder.layers[k - 1].self_attn
            self.handles.append(attention.register_forward_hook(_bind(_fastv_score_hook, ref), with_kwargs=True,
                                                                prepend=True))
            for layer_idx in range(k, layers):
                hook = functools.partial(_pruned_layer_pre_hook, first=layer_idx == k)
                self.handles.append(decoder.layers[layer_idx].register_forward_pre_hook(
                    _bind(hook, ref), with_kwargs=True))
        else:
            layers = self.adapter.encoder_layers(model)
            chosen = self.options.get("vision_layer")
            chosen = self.adapter.default_layer(model) if chosen is None else chosen
            if not -len(layers) <= chosen < len(layers):
                self.settings = None
                raise ValueError(
                    f"vision_layer={chosen} is out of range for a {len(layers)}-layer vision encoder"
                )
            attention = self.adapter.attention_module(layers[chosen])
            self.handles.append(attention.register_forward_hook(_bind(_vision_hook, ref, False), with_kwargs=True))
            self.handles.append(decoder.register_forward_pre_hook(_bind(_language_model_pre_hook, ref),
                                                                  with_kwargs=True))

    # ----- the prompt ---------------------------------------------------------------------------------
    def begin(self, input_ids: torch.Tensor | None, inputs: dict) -> None:
        self.state = None
        self.last_stats = None
        if input_ids is None or input_ids.dim() != 2:
            return
        model = self.model
        ids = torch.tensor(visual_token_ids(model.config), device=input_ids.device)
        visual = torch.isin(input_ids, ids)
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            visual &= mask.bool()
        protected = torch.zeros_like(visual)
        self.state = PromptState(input_ids=input_ids, inputs=inputs, visual=visual, protected=protected)
        counts = visual.sum(dim=1)
        self.last_stats = {
            "visual_tokens_in": int(counts.max()),
            "visual_tokens": int(counts.max()),
            "visual_tokens_per_sample": counts.tolist(),
        }

    def mark_protected(self) -> None:
        """Mark the tokens the architecture never prunes (LLaVA-OneVision's image newlines)."""
        st = self.state
        for modality, flat in self.adapter.protected_tokens(self.model, self.calls).items():
            token_id = self._token_id(modality)
            where = st.input_ids == token_id
            if token_id is not None and int(where.sum()) == flat.numel():
                st.protected[where] = flat.to(st.protected.device)

    def _token_id(self, modality: str) -> int | None:
        config = self.model.config
        for name in (f"{modality}_token_id", f"{modality}_token_index"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    def _finish(self, keep: torch.Tensor) -> bool:
        """Record the pruned layout for keep `[b, L]`; False when every token stays."""
        st = self.state
        if bool(keep.all()):
            return False
        st.index, valid = left_padded_layout(keep)
        original = st.inputs.get("attention_mask")
        if isinstance(original, torch.Tensor) and original.dim() == 2:
            valid = valid & gather_sequence(original.bool(), st.index, 1)
        st.valid = valid
        kept_visual = (st.visual & keep).sum(dim=1)
        self.last_stats["visual_tokens_kept_per_sample"] = kept_visual.tolist()
        return True

    def _visual_after(self) -> torch.Tensor:
        st = self.state
        return gather_sequence(st.visual, st.index, 1) & st.valid

    def set_cache_visual_mask(self, cache) -> None:
        """Tell an eviction cache (VL-Cache) which slots of the pruned prompt are visual."""
        if cache is not None and hasattr(cache, "visual_mask"):
            cache.visual_mask = self._visual_after()

    # ----- projector side -------------------------------------------------------------------------------
    def plan_projector(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """Select/merge the visual tokens of the prompt; return the new embeddings (or None: nothing pruned)."""
        st = self.state
        maps = self.adapter.token_maps(self.model, self.calls) if self.calls else {}
        self.calls = {}
        if not maps:
            raise ValueError(
                f"prune={self.spec.name!r} needs the vision encoder's attention, but the prompt's visual "
                f"features were not computed by this forward (pass pixel_values, not precomputed features)"
            )
        embeds = embeds.clone()
        keep = ~st.visual
        segments = segments_of(maps, st.input_ids, {modality: self._token_id(modality) for modality in maps},
                               st.protected)
        kept_total = select_projector(self.spec, self.budget, self.options, embeds, keep, segments)
        if not self._finish(keep):
            return None
        self.last_stats["visual_tokens"] = max(kept_total) if kept_total else 0
        self.last_stats["visual_tokens_per_sample"] = kept_total
        return embeds

    # ----- FastV ----------------------------------------------------------------------------------------
    def plan_fastv(self, module, arguments: dict) -> None:
        st = self.state
        hidden = arguments["hidden_states"]
        if hidden.shape[1] != st.input_ids.shape[1]:
            return
        self.mark_protected()
        self.calls = {}
        attention = last_token_attention(module, hidden, arguments["position_embeddings"],
                                         arguments.get("attention_mask"))
        keep, kept_total = select_fastv(attention, st.visual, st.protected, self.budget)
        if self._finish(keep):
            k = self.options["layer"]
            layers = self.text_config.num_hidden_layers
            self.last_stats["visual_tokens_per_layer"] = [self.last_stats["visual_tokens_in"]] * k + [
                max(kept_total)] * (layers - k)
            self.last_stats["fastv_layer"] = k


def _bind(function, ref, needs_state: bool = True):
    def hook(*args):
        runtime = ref()
        if runtime is None or (needs_state and runtime.state is None):
            return None
        return function(runtime, *args)

    return hook


# ----- hooks ------------------------------------------------------------------------------------------
def model_pre_hook(model, args, kwargs):
    """Registered on every forked model: starts the prompt's state or marks a decoding step."""
    runtime: PruningRuntime = model._pruning_runtime
    settings = model.compression.prune
    if settings is not runtime.settings:
        runtime.configure(settings)
    if settings is None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = passed_cache(kwargs)
    prefill = cache is None or cache.get_seq_length() == 0
    if prefill:
        inputs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
        if not kwargs.get("mm_encoder_outputs"):
            runtime.calls = {}  # this forward encodes the images itself (else `generate` just did)
        runtime.begin(input_ids, inputs)
        st = runtime.state
        if st is not None and not bool(st.visual.any()):
            runtime.state = None  # text-only prompt: nothing to prune
    elif runtime.state is not None:
        runtime.state.phase = "decode"
    if runtime.state is not None:
        mask = kwargs.get("attention_mask")
        runtime.state.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return None


def _vision_hook(runtime: PruningRuntime, module, args, kwargs, output):
    if runtime.current is None:
        return None
    arguments = bind_attention_arguments(module, args, kwargs)
    queries, keys, scaling, segments = runtime.adapter.queries_keys(module, arguments)
    with torch.no_grad():
        scores = vision_scores(queries, keys, scaling, runtime.adapter.score_mode, segments)
    runtime.current.append((scores, keys.transpose(1, 2).float()))  # keys [B, N, H, D]
    return None


def _recording(ref, modality: str, original):
    """Wrap the inner model's `get_{modality}_features` so the runtime knows which call its vision-hook
    records belong to and with which inputs (image sizes, grids) the upstream packing ran."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        runtime = ref()
        if runtime is None or runtime.settings is None:
            return original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        inputs = {k: v for k, v in bound.items() if k != "kwargs"}
        inputs.update(bound.get("kwargs", {}))
        records: list = []
        runtime.calls[modality] = (inputs, records)
        previous, runtime.current = runtime.current, records
        try:
            return original(*args, **kwargs)
        finally:
            runtime.current = previous

    return wrapper


def _language_model_pre_hook(runtime: PruningRuntime, module, args, kwargs):
    st = runtime.state
    if st.phase == "prefill":
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != st.input_ids.shape:
            return None
        with torch.no_grad():
            new = runtime.plan_projector(embeds)
        if new is None:
            return None
        kwargs["inputs_embeds"] = gather_sequence(new, st.index, 1)
        kwargs["attention_mask"] = st.valid.long()
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            length = st.input_ids.shape[1]
            position_ids = torch.arange(length, device=embeds.device)[None].expand(embeds.shape[0], -1)
        kwargs["position_ids"] = gather_sequence(position_ids, st.index, -1)
        runtime.set_cache_visual_mask(passed_cache(kwargs))
        return args, kwargs
    if st.index is None:
        return None
    full = st.input_ids.shape[1]
    if st.mask2d is not None:
        kwargs["attention_mask"] = torch.cat([st.valid.long(), st.mask2d[:, full:].long()], dim=-1)
    return args, kwargs


def _fastv_score_hook(runtime: PruningRuntime, module, args, kwargs, output):
    st = runtime.state
    if st.phase != "prefill" or st.index is not None:
        return None
    with torch.no_grad():
        runtime.plan_fastv(module, bind_attention_arguments(module, args, kwargs))
    return None


def _pruned_layer_pre_hook(runtime: PruningRuntime, layer, args, kwargs, first: bool):
    """`first`: layer K, which receives the whole prompt and gathers it; the later layers receive the pruned
    sequence, which is as long as the prompt where a sample keeps every token (a text-only one), so its
    length cannot tell."""
    st = runtime.state
    if st.index is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    full = st.input_ids.shape[1]
    if st.phase == "prefill":
        if first:
            hidden = gather_sequence(hidden, st.index, 1)
            runtime.set_cache_visual_mask(passed_cache(kwargs))
        cos, sin = kwargs["position_embeddings"]
        if cos.shape[-2] == full:
            kwargs["position_embeddings"] = (gather_sequence(cos, st.index, -2), gather_sequence(sin, st.index, -2))
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == full:
            kwargs["position_ids"] = gather_sequence(position_ids, st.index, -1)
        key_valid = st.valid
    elif getattr(passed_cache(kwargs), "static_decoding", None) is not None:
        # Static decoding masks every attention from the cache's own buffers, and a captured step may not
        # read a device value on the host, as building this mask would.
        return None
    else:
        new = torch.ones(hidden.shape[0], hidden.shape[1], dtype=torch.bool, device=hidden.device)
        generated = st.mask2d[:, full:].bool() if st.mask2d is not None else new
        key_valid = torch.cat([st.valid, generated], dim=-1)
    kwargs["attention_mask"] = attention_mask_for(runtime.text_config, key_valid, hidden.shape[1], hidden.dtype)
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs


class PruningMixin:
    """Mixed in front of `CompressionMixin`: installs the pruning point hooks (inactive without `prune=`)."""

    pruning_adapter: VisionAdapter = VisionAdapter()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pruning_runtime = PruningRuntime(self, type(self).pruning_adapter)
        self.register_forward_pre_hook(model_pre_hook, with_kwargs=True)

    def generate(self, *args, **kwargs):
        # configure before `generate` pre-encodes the images (transformers >= 5.2x does, before prefill)
        runtime = self._pruning_runtime
        if self.compression.prune is not runtime.settings:
            runtime.configure(self.compression.prune)
        return super().generate(*args, **kwargs)

    def pruning_stats(self) -> dict | None:
        """What the last prompt's pruning did: visual tokens in, reaching the LLM (and per layer for FastV)."""
        runtime = getattr(self, "_pruning_runtime", None)
        return None if runtime is None or runtime.settings is None else runtime.last_stats
