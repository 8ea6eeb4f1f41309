"""InternVL (pixel-shuffled tiles plus a thumbnail; Qwen2 or Llama-style language model).

An adapter over the upstream transformers class (a subclass; no upstream method is copied) adding the
compression points:
- the KV cache (`CompressionMixin.generate`): created and hooked into the language model's attention.
- visual-token pruning (`PruningMixin`): InternViT has a [CLS] token, so scores are the [CLS] attention of
  the feature layer. A language-model token is a pixel-shuffled 2x2 group of patches; pushing the per-patch
  score/key maps through the upstream `pixel_shuffle` gives each token its four patches, averaged. Each image
  (all its tiles and the thumbnail: one contiguous run of context tokens) is pruned as one unit.
"""

from __future__ import annotations

import torch
from transformers.models.internvl import modeling_internvl as upstream

from ..common import CompressionMixin
from ..pruning_points import PruningMixin
from ..vision_adapter import TokenMaps, VisionAdapter


class InternVLAdapter(VisionAdapter):
    score_mode = "cls"

    def encoder_layers(self, model):
        return model.model.vision_tower.encoder.layer

    def default_layer(self, model):
        layer = model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        count = len(self.encoder_layers(model))
        return count + layer if layer < 0 else max(layer - 1, 0)

    def attention_module(self, layer):
        return layer.attention

    def queries_keys(self, module, arguments):
        hidden = arguments["hidden_states"]
        batch, n, _ = hidden.shape
        queries = module.q_norm(module.q_proj(hidden)).reshape(batch, n, module.num_heads, -1).transpose(1, 2)
        keys = module.k_norm(module.k_proj(hidden)).reshape(batch, n, module.num_heads, -1).transpose(1, 2)
        return queries, keys, module.scale, None

    def token_maps(self, model, calls):
        if "image" not in calls or not calls["image"][1]:
            return {}
        records = calls["image"][1]
        scores = torch.cat([r[0] for r in records])  # [B, 1 + N]
        keys = torch.cat([r[1] for r in records])  # [B, 1 + N, H, D]
        heads, dim = keys.shape[2:]
        maps = torch.cat([scores[..., None].float(), keys.flatten(2).float()], dim=-1)
        if getattr(model.config, "vision_feature_select_strategy", "default") == "default":
            maps = maps[:, 1:]
        batch, n, channels = maps.shape
        side = int(n ** 0.5)
        shuffled = model.model.pixel_shuffle(maps.reshape(batch, side, side, channels),
                                             scale_factor=model.config.downsample_ratio)
        groups = shuffled.shape[-1] // channels
        tokens = shuffled.reshape(batch, -1, groups, channels).mean(dim=2).flatten(0, 1)
        return {"image": TokenMaps(tokens[:, 0], tokens[:, 1:].reshape(-1, heads, dim),
                                   torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))}


class InternVLForConditionalGeneration(PruningMixin, CompressionMixin, upstream.InternVLForConditionalGeneration):
    pruning_adapter = InternVLAdapter()
