"""LLaVA-OneVision (Qwen2 language model; anyres tiles, image-newline tokens, pooled video frames).

An adapter over the upstream transformers class (a subclass; no upstream method is copied) adding the
compression points:
- the KV cache (`CompressionMixin.generate`): created and hooked into the Qwen2 attention layers.
- visual-token pruning (`PruningMixin`): the SigLIP feature layer's attention (SigLIP has no [CLS], so the
  mean attention each patch receives) and keys are mapped to the projector's tokens by pushing them through
  the upstream `pack_image_features` (anyres tiles + base image, unpadding, anyres_max interpolation) and
  `apply_pooling` (video frames), with NaN as the newline vector: image-newline tokens are found that way and
  are never pruned (they do not count against the budget).
"""

from __future__ import annotations

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as upstream

from ..common import CompressionMixin
from ..pruning_points import PruningMixin
from ..vision_adapter import TokenMaps, VisionAdapter


def video_frames(inputs: dict) -> torch.Tensor:
    """The videos `get_video_features` was called with: its `pixel_values_videos` (`pixel_values` before
    transformers 5.18)."""
    return inputs["pixel_values_videos"] if "pixel_values_videos" in inputs else inputs["pixel_values"]


class LlavaOnevisionAdapter(VisionAdapter):
    score_mode = "mean"

    def encoder_layers(self, model):
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def default_layer(self, model):
        layer = model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        count = len(self.encoder_layers(model))
        # hidden_states[k] is the output of encoder layer k - 1 (hidden_states[0] are the embeddings)
        return count + layer if layer < 0 else max(layer - 1, 0)

    def queries_keys(self, module, arguments):
        hidden = arguments["hidden_states"]
        batch, n, _ = hidden.shape
        queries = module.q_proj(hidden).view(batch, n, -1, module.head_dim).transpose(1, 2)
        keys = module.k_proj(hidden).view(batch, n, -1, module.head_dim).transpose(1, 2)
        return queries, keys, module.scale, None

    def _image_patches(self, model, inputs) -> list[int]:
        config = model.config
        image_sizes = inputs["image_sizes"]
        batch_num_images = inputs.get("batch_num_images")
        if batch_num_images is None:
            need_patching = [True] * len(image_sizes)
        else:
            need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
        return [
            upstream.image_size_to_num_patches(
                image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
            ) if patch else 1
            for size, patch in zip(image_sizes, need_patching)
        ]

    def token_maps(self, model, calls):
        config, inner = model.config, model.model
        out = {}

        def as_map(records):
            scores = torch.cat([r[0] for r in records])  # [B, N]
            keys = torch.cat([r[1] for r in records])  # [B, N, H, D]
            heads, dim = keys.shape[2:]
            maps = torch.cat([scores[..., None].float(), keys.flatten(2).float()], dim=-1)
            if config.vision_feature_select_strategy == "default":
                maps = maps[:, 1:]
            return maps, heads, dim

        def finish(rows: torch.Tensor, heads: int, dim: int, lengths: list[int]) -> TokenMaps:
            scores = rows[:, 0]
            return TokenMaps(scores, rows[:, 1:].reshape(-1, heads, dim), torch.isnan(scores), lengths)

        if "image" in calls and calls["image"][1]:
            inputs, records = calls["image"]
            maps, heads, dim = as_map(records)
            newline = torch.full((maps.shape[-1],), float("nan"), device=maps.device)
            packed, _ = inner.pack_image_features(
                list(torch.split(maps, self._image_patches(model, inputs), dim=0)), inputs["image_sizes"],
                image_newline=newline, vision_aspect_ratio=getattr(config, "vision_aspect_ratio", "anyres_max_9"),
            )
            out["image"] = finish(torch.cat(packed), heads, dim, [p.shape[0] for p in packed])
        if "video" in calls and calls["video"][1]:
            inputs, records = calls["video"]
            videos = video_frames(inputs)
            maps, heads, dim = as_map(records)
            pooled = inner.apply_pooling(maps)
            pooled = pooled.reshape(videos.shape[0], -1, pooled.shape[-1])
            newline = torch.full((videos.shape[0], 1, pooled.shape[-1]), float("nan"), device=pooled.device)
            pooled = torch.cat([pooled, newline], dim=1)
            out["video"] = finish(pooled.flatten(0, 1), heads, dim, [pooled.shape[1]] * videos.shape[0])
        return out

    def protected_tokens(self, model, calls):
        """Image-newline positions, found by running the layout alone on all-zero statistics."""
        vision = model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if model.config.vision_feature_select_strategy == "default":
            n += 1
        fake = {}
        if "image" in calls:
            crops = sum(self._image_patches(model, calls["image"][0]))
            fake["image"] = (calls["image"][0], [(torch.zeros(crops, n), torch.zeros(crops, n, 1, 1))])
        if "video" in calls:
            frames = video_frames(calls["video"][0]).shape[:2].numel()
            fake["video"] = (calls["video"][0], [(torch.zeros(frames, n), torch.zeros(frames, n, 1, 1))])
        return {modality: maps.protected for modality, maps in self.token_maps(model, fake).items()}


class LlavaOnevisionForConditionalGeneration(
    PruningMixin, CompressionMixin, upstream.LlavaOnevisionForConditionalGeneration
):
    pruning_adapter = LlavaOnevisionAdapter()
