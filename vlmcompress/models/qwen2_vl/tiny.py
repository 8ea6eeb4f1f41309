"""A tiny random-weight Qwen2-VL or Qwen2.5-VL (`vlmcompress.testing`): a 2-block vision encoder in 14-px
patches merged 2x2, images of 56x56 to 112x112 pixels, M-RoPE sections [2, 3, 3]."""

from __future__ import annotations

SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# what the chat template writes for an image and a video
PLACEHOLDERS = ("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")


def build(model_type: str, tokenizer, ids: dict, text: dict, chat_template: str):
    from transformers import AutoConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=56,
                      fullatt_block_indexes=[1])
    else:
        vision.update(mlp_ratio=2)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    config = AutoConfig.for_model(
        model_type,
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
    )
    return config, processor
