"""The reference architectures: small configs, a BPE tokenizer trained on SynthVQA text, upstream processors.

Only stable transformers APIs are used (AutoConfig.for_model, AutoModelForImageTextToText.from_config,
the upstream processor classes), so the same code builds the models on transformers 5.17 and 5.23.
"""

from __future__ import annotations

import copy

import torch

from vlmcompress.testing import _SPECIAL, _chat_template

from . import synthvqa

ARCHITECTURES = ("qwen2_vl", "llava_onevision")
VOCAB_SIZE = 640  # BPE target; the corpus is small, so common words become single tokens

# A few million parameters: about 5 M (Qwen2-VL) and 5.5 M (LLaVA-OneVision), ~20 MB in float32.
TEXT = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
            initializer_range=0.02)
SIZE = synthvqa.IMAGE_SIZE  # 252


def build_tokenizer(model_type: str, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE trained on the benchmark's text, with the chat and vision tokens of `model_type`.

    Digits are split one per token, so any number is spelled out of ten digit tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(synthvqa.text_corpus(), trainer=trainer)
    specials = _SPECIAL[model_type]
    extra = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *specials.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=specials, padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def build_model(model_type: str, tokenizer=None, seed: int = 0):
    """`(model, processor)`: a freshly initialised reference `model_type` and its processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown reference architecture {model_type!r}; choose one of {ARCHITECTURES}")
    tokenizer = tokenizer or build_tokenizer(model_type)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL[model_type].items()}
    template = _chat_template(model_type)
    no_bos = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = dict(TEXT, vocab_size=len(tokenizer), **no_bos)
    norm = dict(image_mean=list(synthvqa.IMAGE_MEAN), image_std=list(synthvqa.IMAGE_STD))
    torch.manual_seed(seed)
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        # 252 x 252 -> 18 x 18 patches of 14 px -> 9 x 9 = 81 merged visual tokens.
        vision = dict(depth=4, embed_dim=128, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                      initializer_range=0.02)
        rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}
        config = AutoConfig.for_model(
            "qwen2_vl", text_config={**text, "rope_parameters": rope}, vision_config=vision, **no_bos,
            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
            vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        )
        pixels = SIZE * SIZE
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, **norm),
            tokenizer=tokenizer, chat_template=template,
            video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels),
        )
    else:  # llava_onevision: SigLIP with 28-px patches; base image + one 252 tile + 9 newlines = 171 tokens
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        config = AutoConfig.for_model(
            "llava_onevision",
            text_config={"model_type": "qwen2", **text},
            vision_config=dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=576,
                               num_hidden_layers=4, num_attention_heads=4, image_size=SIZE, patch_size=28),
            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
            vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[SIZE, SIZE]], **no_bos,
        )
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size={"height": SIZE, "width": SIZE},
                                                         image_grid_pinpoints=[[SIZE, SIZE]], **norm),
            tokenizer=tokenizer, num_image_tokens=(SIZE // 28) ** 2,
            video_processor=LlavaOnevisionVideoProcessor(size={"height": SIZE, "width": SIZE}),
            vision_feature_select_strategy="full", chat_template=template,
        )
    for cfg in (config, config.text_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = None
        cfg.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def chat_prompt(processor, question: str) -> str:
    """The chat-formatted prompt for one image and `question`, ending where the answer starts."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.inference_mode()
def generate_answers(model, processor, questions, images, batch_size: int = 100, max_new_tokens: int = 8,
                     device=None) -> list[str]:
    """Greedy answers of `model` to (question, image) pairs, batched with left padding."""
    device = device or next(model.parameters()).device
    questions, images = list(questions), list(images)
    out = []
    for i in range(0, len(questions), batch_size):
        texts = [chat_prompt(processor, q) for q in questions[i:i + batch_size]]
        inputs = processor(text=texts, images=images[i:i + batch_size], padding=True, padding_side="left",
                           return_tensors="pt").to(device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def grow_language_model(model, new_layers: int) -> None:
    """Insert `new_layers` decoder layers before the language model's last one, as no-ops at first.

    Block expansion (LLaMA Pro, Wu et al. 2024, arXiv:2401.02415): each new layer is a copy of the
    layer before it with its output projections (attention `o_proj`, MLP `down_proj`) zeroed, so the
    residual stream and the model's answers are unchanged until training moves them. Used to give a
    trained checkpoint more depth for multi-step questions without starting over.
    """
    if new_layers < 1:
        raise ValueError(f"new_layers must be >= 1, got {new_layers}")
    text_model = model.model.language_model
    layers, config = text_model.layers, model.config.text_config
    template = layers[-2] if len(layers) > 1 else layers[-1]
    grown = []
    for _ in range(new_layers):
        layer = copy.deepcopy(template)
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        grown.append(layer)
    text_model.layers = torch.nn.ModuleList([*layers[:-1], *grown, layers[-1]])
    for index, layer in enumerate(text_model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by it
    config.num_hidden_layers = len(text_model.layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * len(text_model.layers)
