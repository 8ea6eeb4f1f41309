"""Tiny random-weight checkpoints of every supported architecture, built offline.

The Hub is not needed: each model is built from a small config, its tokenizer is a
byte-level BPE made with `tokenizers`, its processor is the upstream one, and the
whole checkpoint is written with `save_pretrained`, so `vlmcompress.load(path)` and
`AutoProcessor.from_pretrained(path)` exercise the real loading code on it.
Tests, the default evaluation run and the CPU benchmark smoke test all use these.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .architectures import ARCHITECTURES as _ARCHITECTURES
from .architectures import architecture

ARCHITECTURES = tuple(_ARCHITECTURES)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif item['type'] == 'video' %}{{ video_placeholder }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens per architecture (the processors find them by these names), and what the chat template writes
# for an image and a video.
_SPECIAL = {name: arch.tiny.SPECIAL_TOKENS for name, arch in _ARCHITECTURES.items()}
_PLACEHOLDER = {name: arch.tiny.PLACEHOLDERS for name, arch in _ARCHITECTURES.items()}


def _text_config(vocab_size: int, **overrides) -> dict:
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        # Large enough that attention is peaked and differs across layers and greedy text is varied,
        # so tests comparing kept tokens or generated text cannot pass by accident.
        initializer_range=0.3,
    )
    text.update(overrides)
    return text


def build_tokenizer(model_type: str):
    """A byte-level BPE tokenizer with the chat and vision special tokens of `model_type`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = _SPECIAL[model_type]
    extra = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *specials.values()]
    # Added here, in this order, so every process gives them the same ids (ids 256...).
    raw.add_special_tokens([AddedToken(token, special=True) for token in extra])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials,
        padding_side="left",
    )
    return tokenizer


def _chat_template(model_type: str) -> str:
    image, video = _PLACEHOLDER[model_type]
    return CHAT_TEMPLATE.replace("{{ image_placeholder }}", image).replace("{{ video_placeholder }}", video)


def build_tiny_model(model_type: str, seed: int = 0, **text_overrides):
    """Return `(model, processor)` of a randomly initialised tiny `model_type` checkpoint."""
    from transformers import AutoModelForImageTextToText

    tiny = architecture(model_type).tiny
    tokenizer = build_tokenizer(model_type)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL[model_type].items()}
    torch.manual_seed(seed)
    config, processor = tiny.build(model_type, tokenizer, ids, _text_config(len(tokenizer), **text_overrides),
                                   _chat_template(model_type))
    for cfg in (config, config.text_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = None
        cfg.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def save_tiny_model(model_type: str, directory: str | Path, seed: int = 0, **text_overrides) -> Path:
    """Build a tiny `model_type` checkpoint and write model, tokenizer and processor to `directory`."""
    directory = Path(directory)
    model, processor = build_tiny_model(model_type, seed=seed, **text_overrides)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "vlmcompress_tiny.json").write_text(json.dumps({"model_type": model_type, "seed": seed}))
    return directory


def random_image(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic RGB noise image of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat_prompt(processor, question: str, num_images: int = 1) -> str:
    """The chat-formatted prompt for `question` about `num_images` images, ready for generation."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
