"""A tiny random-weight InternVL (`vlmcompress.testing`): a 2-layer InternViT on 32-px tiles in 8-px patches,
pixel-shuffled to 4 tokens a tile, up to 4 tiles and a thumbnail."""

from __future__ import annotations

SPECIAL_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}
PLACEHOLDERS = ("<IMG_CONTEXT>", "<video>")  # what the chat template writes for an image and a video


def build(model_type: str, tokenizer, ids: dict, text: dict, chat_template: str):
    from transformers import AutoConfig, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    config = AutoConfig.for_model(
        model_type,
        text_config={"model_type": "qwen2", **text},
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=[32, 32], patch_size=[8, 8],
        ),
        image_token_id=ids["context_image_token"],
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4, min_patches=1
    )
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4, chat_template=chat_template,
        video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}),
    )
    return config, processor
