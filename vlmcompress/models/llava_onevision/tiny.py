"""A tiny random-weight LLaVA-OneVision (`vlmcompress.testing`): SigLIP of 2 layers on 32-px images in 8-px
patches, anyres tiles up to 64 px."""

from __future__ import annotations

SPECIAL_TOKENS = {"image_token": "<image>", "video_token": "<video>"}
PLACEHOLDERS = ("<image>", "<video>")  # what the chat template writes for an image and a video


def build(model_type: str, tokenizer, ids: dict, text: dict, chat_template: str):
    from transformers import (
        AutoConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    config = AutoConfig.for_model(
        model_type,
        text_config={"model_type": "qwen2", **text},
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8,
        ),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]]
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        vision_feature_select_strategy="full", chat_template=chat_template,
    )
    return config, processor
