"""Qwen2-VL and Qwen2.5-VL (Qwen2 language model with M-RoPE 3-D positions; dynamic resolution).

Adapters over the upstream transformers classes (subclasses; no upstream method is copied) adding the
compression points:
- the KV cache (`CompressionMixin.generate`). The cache reports tokens *seen* as its sequence
  length, so the rope deltas and 3-D positions of decoded tokens stay the uncompressed ones.
- visual-token pruning (`PruningMixin`): a language-model token is a 2x2 group of patches merged by the
  `PatchMerger`; its score (mean attention received in the last vision block: no [CLS]) and key are the
  means over its four patches. Qwen2.5-VL's blocks see the patches in window order; we undo that with the
  upstream `get_vision_window_index`. Survivors keep their original 3-D M-RoPE positions (the position ids
  `generate` computed are gathered, never recomputed), so `rope_deltas` and decoding positions are unchanged.
"""

from __future__ import annotations

import sys

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as upstream_2_5
from transformers.models.qwen2_vl import modeling_qwen2_vl as upstream

from ..common import CompressionMixin
from ..pruning_points import PruningMixin
from ..vision_adapter import TokenMaps, VisionAdapter


class Qwen2VLAdapter(VisionAdapter):
    score_mode = "mean"

    def encoder_layers(self, model):
        return model.model.visual.blocks

    def attention_module(self, layer):
        return layer.attn

    def queries_keys(self, module, arguments):
        hidden = arguments["hidden_states"]
        n = hidden.shape[0]
        queries, keys, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = arguments["position_embeddings"]
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotate(queries, keys, cos, sin)
        bounds = arguments["cu_seqlens"].tolist()
        return (queries.transpose(0, 1)[None], keys.transpose(0, 1)[None], module.scaling,
                list(zip(bounds[:-1], bounds[1:])))

    def _to_tokens(self, model, records, grid: torch.Tensor) -> TokenMaps:
        visual = model.model.visual
        unit = visual.spatial_merge_size ** 2
        scores = torch.cat([r[0][0] for r in records])  # [N]
        keys = torch.cat([r[1][0] for r in records])  # [N, H, D]
        heads, dim = keys.shape[1:]
        maps = torch.cat([scores[:, None].float(), keys.flatten(1).float()], dim=-1)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: blocks run in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            window_index = window_index.to(maps.device)
            order = (window_index[:, None] * unit + torch.arange(unit, device=maps.device)).flatten()
            original = torch.empty_like(maps)
            original[order] = maps
            maps = original
        tokens = maps.view(-1, unit, maps.shape[-1]).mean(dim=1)
        lengths = (grid.prod(-1) // unit).tolist()
        return TokenMaps(tokens[:, 0], tokens[:, 1:].reshape(-1, heads, dim),
                         torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device), lengths)

    def token_maps(self, model, calls):
        out = {}
        for modality in ("image", "video"):
            if modality in calls and calls[modality][1]:
                inputs, records = calls[modality]
                out[modality] = self._to_tokens(model, records, inputs[f"{modality}_grid_thw"])
        return out


class Qwen2VLForConditionalGeneration(PruningMixin, CompressionMixin, upstream.Qwen2VLForConditionalGeneration):
    pruning_adapter = Qwen2VLAdapter()


class Qwen2_5_VLForConditionalGeneration(
    PruningMixin, CompressionMixin, upstream_2_5.Qwen2_5_VLForConditionalGeneration
):
    pruning_adapter = Qwen2VLAdapter()
