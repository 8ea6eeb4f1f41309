"""A training forward of the reference models with the same math in far fewer kernels.

The reference models are tiny, so a GPU training step is bound by the number of kernels launched
(and by host-device syncs), and the upstream code pays for both per image:

- Qwen2-VL's vision attention (`VisionAttention.forward`, non-flash branch) splits q/k/v per image
  (`lengths.tolist()`, a sync per layer) and calls attention once per image; its rotary position ids
  (`vision_utils.get_vision_position_ids`) are built per image; the M-RoPE positions of the language
  model (`Qwen2VLModel.get_rope_index`) are built per sample, with syncs each.
- LLaVA-OneVision's `get_image_features` and `pack_image_features` reshape, unpad and pack every image
  on its own, reading its size and crop count back from the device several times.

In SynthVQA training every image has the same size and every sample exactly one image, so all of this
is one batched operation. `FastForward(model)` is called like the model, in the training loop only;
it reads the batch's image grid back once (its one host sync a step), and for a batch of equal images

- Qwen2-VL: passes the positions upstream would compute, built vectorised: `position_ids` (so
  `get_rope_index` is skipped) and, through the `image_` precomputed kwargs that `get_image_features`
  accepts, the vision tower's `position_ids`, `cu_seqlens` and `max_seqlen` (cached per batch shape);
  and sets the vision config's attention to `BATCHED_ATTENTION`, registered with transformers'
  `AttentionInterface`: a name with "flash" in it makes `VisionAttention` pass the packed sequence and
  its `cu_seqlens` in one call, which becomes one SDPA call over `[images, heads, length, head_dim]`;
- LLaVA-OneVision: replaces `get_image_features` on the model instance with a batched version.

Both are undone when the call returns, so evaluation, generation and `save_pretrained` see the plain
upstream model. Any other batch (images of different sizes, videos, several images in a sample) runs
the plain model. `FastForward.verify` checks loss and gradients against the plain model.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

BATCHED_ATTENTION = "flash_batched_sdpa"
RTOL = 1e-4  # FastForward.verify: loss and gradients vs the plain model, float32 (wrong positions: ~1e-3)
ZERO_GRADIENT_FLOOR = 1e-4  # FastForward.verify: gradient scale below which a parameter's gradient counts as zero


def batched_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Attention over images packed as `[1, heads, images * length, head_dim]`, all of one `length`.

    One transformers SDPA call on `[images, heads, length, head_dim]`: the same attention, per image,
    as upstream's loop over the images. Returns `[1, images * length, heads, head_dim]`, as a flash
    attention implementation does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, heads, total, dim = query.shape
    images = cu_seq_lens_q.shape[0] - 1
    if images * max_length_q != total:
        raise ValueError(f"{BATCHED_ATTENTION} needs images of one length; got {total} tokens in {images} images "
                         f"of at most {max_length_q}")

    def per_image(x):
        return x.view(heads, images, max_length_q, dim).transpose(0, 1)

    out, _ = sdpa_attention_forward(module, per_image(query), per_image(key), per_image(value), None,
                                    dropout=dropout, scaling=scaling, is_causal=False)
    return out.reshape(1, total, heads, dim), None


def mrope_position_ids(attention_mask, is_image, grid_w: int, advance: int, image_tokens: int):
    """`Qwen2VLModel.get_rope_index` for left-padded rows that hold exactly one image each, vectorised.

    Text tokens count up from 0 over the valid tokens; the image's `image_tokens` tokens (a grid
    `grid_w` wide) sit at (start, start + row, start + column) with `start` the image's first position;
    the text after the image continues at start + `advance`; padding stays at 0. Returns `[3, B, L]`.
    """
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
    image = is_image.long()
    text = (valid & ~is_image).long()
    text_before = text.cumsum(-1) - text
    images_seen = image.cumsum(-1)
    text_pos = text_before + (images_seen // image_tokens) * advance
    k = images_seen - 1  # index of an image token within its image
    image_pos = torch.stack([text_before, text_before + k // grid_w, text_before + k % grid_w])
    pos = torch.where(is_image, image_pos, text_pos.expand(3, -1, -1))
    return pos.masked_fill(~valid, 0)


class FastForward:
    """`FastForward(model)(**batch)` is `model(**batch)` in fewer kernels; see the module docstring."""

    def __init__(self, model):
        self.model = model
        self.arch = model.config.model_type
        if self.arch == "qwen2_vl":
            if model.config.vision_config._attn_implementation != "sdpa":
                raise ValueError("the batched vision attention replaces SDPA; this model's vision tower uses "
                                 f"{model.config.vision_config._attn_implementation!r}")
            from transformers import AttentionInterface

            AttentionInterface.register(BATCHED_ATTENTION, batched_attention)
        elif self.arch != "llava_onevision":
            raise ValueError(f"no fast forward for {self.arch!r}")
        self._vision_inputs = {}  # Qwen2-VL vision tower positions per (images, grid, device)

    def __call__(self, **batch):
        plan = self._plan(batch)
        if plan is None:
            return self.model(**batch)
        patch, extra = plan
        with patch:
            return self.model(**batch, **extra)

    def _plan(self, batch):
        """None for a batch the fast path does not cover, else (context manager, extra forward kwargs)."""
        return self._qwen_plan(batch) if self.arch == "qwen2_vl" else self._llava_plan(batch)

    # ------------------------------------------------------------------ Qwen2-VL

    def _qwen_plan(self, batch):
        grid, types = batch.get("image_grid_thw"), batch.get("mm_token_type_ids")
        if grid is None or types is None or "position_ids" in batch or batch.get("pixel_values_videos") is not None:
            return None
        is_image = types == 1
        # the one host sync of a step: every image's grid and every row's image-token count
        values = torch.cat([grid.flatten(), is_image.sum(-1)]).tolist()
        grids, counts = values[:grid.numel()], values[grid.numel():]
        if not counts or grids != grids[:3] * len(counts):  # one grid per row, all equal
            return None
        t, h, w = grids[:3]
        m = self.model.config.vision_config.spatial_merge_size
        image_tokens = t * (h // m) * (w // m)
        if t != 1 or set(counts) != {image_tokens}:  # a still image, and one in each row
            return None
        position_ids = mrope_position_ids(batch.get("attention_mask"), is_image, w // m, max(h, w) // m, image_tokens)
        extra = {"position_ids": position_ids, **self._qwen_vision_inputs(len(counts), h, w, grid.device)}
        return self._batched_vision_attention(), extra

    def _qwen_vision_inputs(self, images: int, h: int, w: int, device) -> dict:
        """The vision tower's position ids, cu_seqlens and max_seqlen, computed by upstream's own helpers."""
        key = (images, h, w, str(device))
        if key not in self._vision_inputs:
            from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

            grid = torch.tensor([[1, h, w]]).repeat(images, 1)
            m = self.model.config.vision_config.spatial_merge_size
            self._vision_inputs[key] = {"image_position_ids": get_vision_position_ids(grid, m).to(device),
                                        "image_cu_seqlens": get_vision_cu_seqlens(grid).to(device),
                                        "image_max_seqlen": h * w}
        return self._vision_inputs[key]

    @contextlib.contextmanager
    def _batched_vision_attention(self):
        config = self.model.config.vision_config
        original, config._attn_implementation = config._attn_implementation, BATCHED_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = original

    # ------------------------------------------------------------------ LLaVA-OneVision

    def _llava_plan(self, batch):
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image)

        sizes, pixels, counts = batch.get("image_sizes"), batch.get("pixel_values"), batch.get("batch_num_images")
        if sizes is None or pixels is None or pixels.dim() != 5 or batch.get("pixel_values_videos") is not None:
            return None
        values = torch.cat([sizes.flatten(), counts if counts is not None else sizes.new_ones(0)]).tolist()
        sizes_list, counts_list = values[:sizes.numel()], values[sizes.numel():]
        size = sizes_list[:2]
        if sizes_list != size * len(pixels) or set(counts_list) - {1}:
            return None
        config = self.model.config
        tile = config.vision_config.image_size
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, tile)
        if crops < 2 or pixels.shape[1] < crops:  # upstream's single-crop path: not batched here
            return None
        grid = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
        side = tile // config.vision_config.patch_size
        full = (grid[0] * side, grid[1] * side)
        kept = unpad_image(torch.empty(0, *full), size).shape[1:]  # upstream trims the same margins on both sides
        layout = dict(crops=crops, grid=grid, side=side, kept=kept, top=(full[0] - kept[0]) // 2,
                      left=(full[1] - kept[1]) // 2)
        return self._llava_image_features(layout), {}

    @contextlib.contextmanager
    def _llava_image_features(self, layout):
        inner = self.model.model
        # replaces LlavaOnevisionModel.get_image_features (and the per-image pack_image_features) on this
        # instance for the call: the same reshape, unpad, newline and packing on all images at once
        inner.get_image_features = lambda *args, **kwargs: _llava_image_features(inner, layout, *args, **kwargs)
        try:
            yield
        finally:
            del inner.get_image_features

    # ------------------------------------------------------------------ check

    def verify(self, batch: dict, rtol: float = RTOL) -> str | None:
        """None when the fast path gives the plain model's loss and gradients on `batch`, else what differs.

        Both run in float32 with TF32 off, so that `rtol` can be small: loss within `rtol` relative,
        each gradient within `rtol` of the largest plain gradient entry of that parameter, floored at
        `ZERO_GRADIENT_FLOOR` of the model's largest entry: some gradients are zero in exact arithmetic
        (key biases, which softmax ignores) and only rounding noise in float32.
        """
        if self._plan(batch) is None:
            return "the batch is not one the fast path covers (one image per sample, all of one size)"
        model, params = self.model, dict(self.model.named_parameters())
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            results = []
            for forward in (model, self):
                model.zero_grad(set_to_none=True)
                loss = forward(**batch).loss
                loss.backward()
                results.append((loss.detach(), {n: p.grad for n, p in params.items()}))
            model.zero_grad(set_to_none=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        (plain_loss, plain), (fast_loss, fast) = results
        largest = {name: g.abs().max().item() for name, g in plain.items() if g is not None}
        floor = ZERO_GRADIENT_FLOOR * max(largest.values())
        if not torch.allclose(fast_loss, plain_loss, rtol=rtol, atol=0):
            return f"loss {fast_loss.item():.6g} vs {plain_loss.item():.6g}"
        for name, g in plain.items():
            f = fast[name]
            if (g is None) != (f is None):
                return f"{name}: gradient {'missing' if f is None else 'unexpected'}"
            if g is not None and not torch.allclose(f, g, rtol=0, atol=rtol * max(largest[name], floor)):
                return f"{name}: gradient differs by {(f - g).abs().max().item():.3g} (max {largest[name]:.3g})"
        return None


def _llava_image_features(model, layout, pixel_values, image_sizes, vision_feature_layer=None,
                          vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None,
                          **kwargs):
    """`LlavaOnevisionModel.get_image_features` for images of one size, each with `layout["crops"]` crops.

    `pooler_output` holds all images' features as one chunk (upstream: one chunk per image); the
    model's forward only concatenates the chunks.
    """
    config = model.config
    layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    max_crops = int((vision_aspect_ratio or config.vision_aspect_ratio).strip("anyres_max_"))
    kwargs.pop("return_dict", None)
    images, crops, side = pixel_values.shape[0], layout["crops"], layout["side"]
    out = model.vision_tower(pixel_values[:, :crops].flatten(0, 1), output_hidden_states=True, return_dict=True,
                             **kwargs)
    if isinstance(layer, int):
        selected = out.hidden_states[layer]
    else:
        selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    if strategy == "default":
        selected = selected[:, 1:]
    features = model.multi_modal_projector(selected).unflatten(0, (images, crops))
    base, dim = features[:, 0], features.shape[-1]
    # tiles -> one [dim, rows, columns] map per image, as pack_image_features builds it
    (gh, gw), (kh, kw), top, left = layout["grid"], layout["kept"], layout["top"], layout["left"]
    tiles = features[:, 1:].reshape(images, gh, gw, side, side, dim).permute(0, 5, 1, 3, 2, 4)
    tiles = tiles.reshape(images, dim, gh * side, gw * side)[:, :, top:top + kh, left:left + kw]
    ratio = math.sqrt(kh * kw / (max_crops * side**2))
    if ratio > 1.1:
        tiles = F.interpolate(tiles, [int(kh // ratio), int(kw // ratio)], mode="bilinear")
    newline = model.image_newline[None, :, None, None].expand(images, -1, tiles.shape[2], 1)
    tiles = torch.cat((tiles, newline.to(tiles.device, tiles.dtype)), dim=-1).flatten(2, 3).transpose(1, 2)
    out.pooler_output = (torch.cat((base, tiles), dim=1).flatten(0, 1),)
    return out
