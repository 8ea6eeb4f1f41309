"""Real-size model configurations and inputs for the benchmark (random bf16 weights).

Speed and memory do not depend on the weights' values, so each model is built from its
published configuration with random weights. The numbers below are transcribed from the
`config.json` of each model's repository on the Hugging Face Hub:

- qwen2_vl_7b: Qwen/Qwen2-VL-7B-Instruct (Qwen2-7B language model; 675M-parameter ViT, 2x2 merge).
- llava_onevision_7b: llava-hf/llava-onevision-qwen2-7b-ov-hf (Qwen2-7B; SigLIP-so400m/14 at 384 px;
  anyres_max_9 with the 6x6 grid of pinpoints).
- internvl2_5_8b: OpenGVLab/InternVL2_5-8B (InternLM2.5-7B language model, a Llama-style decoder
  with GQA; InternViT-300M/14 at 448 px; pixel shuffle 0.5 -> 256 tokens a tile; up to 12 tiles
  plus a thumbnail).

Inputs go through the real upstream image processors; the tokenizer is the offline byte-level one
of `vlmcompress.testing` (only the number of text tokens matters for timing).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import AutoConfig

from vlmcompress.testing import _chat_template, build_tokenizer

QWEN2_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


def _token_ids(tokenizer, model_type: str) -> dict:
    from vlmcompress.testing import _SPECIAL

    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL[model_type].items()}


def build(name: str, toy_dir: str | None = None):
    """Return `(model_type, config, processor)` for a benchmark model name."""
    from transformers import (
        GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if name.startswith("qwen2_vl"):
        model_type = "qwen2_vl"
        tokenizer = build_tokenizer(model_type)
        ids = _token_ids(tokenizer, model_type)
        config = AutoConfig.for_model(
            model_type,
            text_config={**QWEN2_7B, "vocab_size": 152064,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_chans=3, hidden_act="quick_gelu"),
            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
            vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        )
        pixels = dict(min_pixels=56 * 56, max_pixels=1456 * 1456)
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=448 * 448),
            chat_template=_chat_template(model_type),
        )
    elif name.startswith("llava_onevision"):
        model_type = "llava_onevision"
        tokenizer = build_tokenizer(model_type)
        ids = _token_ids(tokenizer, model_type)
        config = AutoConfig.for_model(
            model_type,
            text_config={"model_type": "qwen2", **QWEN2_7B, "vocab_size": 152128, "rope_theta": 1e6},
            vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                               num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
            image_token_id=ids["image_token"], video_token_id=ids["video_token"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=ONEVISION_PINPOINTS,
        )
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384},
                                                         image_grid_pinpoints=ONEVISION_PINPOINTS),
            video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
            tokenizer=tokenizer, num_image_tokens=729, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=_chat_template(model_type),
        )
    elif name.startswith("internvl"):
        model_type = "internvl"
        tokenizer = build_tokenizer(model_type)
        ids = _token_ids(tokenizer, model_type)
        config = AutoConfig.for_model(
            model_type,
            text_config={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "vocab_size": 92553, "max_position_embeddings": 32768, "rope_theta": 1e6,
                         "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=[448, 448], patch_size=[14, 14]),
            image_token_id=ids["context_image_token"], downsample_ratio=0.5, vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )
        processor = InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True,
                                                  max_patches=12, min_patches=1),
            video_processor=InternVLVideoProcessor(size={"height": 448, "width": 448}),
            tokenizer=tokenizer, image_seq_length=256, chat_template=_chat_template(model_type),
        )
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose qwen2_vl_7b, llava_onevision_7b, internvl2_5_8b")
    for cfg in (config, config.text_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = None  # never stop early: every run decodes exactly the requested tokens
        cfg.bos_token_id = None
    return model_type, config, processor


def image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


QUESTION = "Describe this image in detail, then answer: what is written in the top-left corner?"


def make_inputs(processor, kind: str, batch: int, hires: int = 1344, first_image: int = 0):
    """Processor outputs for `batch` copies of one prompt: `hires` (one large image giving several
    thousand visual tokens) or `multi` (four 448-px images); the images are drawn from seeds counted from
    `first_image`, so different values give different prompts of the same shape."""
    if kind == "hires":
        images = [[image(first_image + i, hires, hires)] for i in range(batch)]
    elif kind == "multi":
        images = [[image(first_image + 4 * i + j, 448, 448) for j in range(4)] for i in range(batch)]
    else:
        raise ValueError(f"unknown input kind {kind!r}; choose hires or multi")
    content = [{"type": "image"}] * len(images[0]) + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[prompt] * batch, images=images, return_tensors="pt", padding=True)
