"""Shared fixtures: tiny random-weight checkpoints of every architecture, written once per session."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmcompress.testing import ARCHITECTURES, chat_prompt, random_image, save_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(save_tiny_model(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def processors(tiny_dirs):
    return {arch: AutoProcessor.from_pretrained(path) for arch, path in tiny_dirs.items()}


def upstream_model(path: str, **kwargs):
    """The plain transformers model, for comparisons."""
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()


def batch_inputs(processor, samples, padding_side="left"):
    """Processor inputs for `samples`, each `(question, image seeds)` (no seed: a text-only prompt); several
    samples make a batch padded on `padding_side`."""
    prompts = [chat_prompt(processor, question, len(seeds)) for question, seeds in samples]
    images = [random_image(seed) for _, seeds in samples for seed in seeds]
    return processor(text=prompts, images=images or None, return_tensors="pt", padding=True,
                     padding_side=padding_side)


def image_inputs(processor, questions=("What is in the picture? Describe it in detail.",), seeds=None):
    """Processor inputs for one image per question; several questions make a left-padded batch."""
    seeds = seeds or list(range(len(questions)))
    return batch_inputs(processor, [(question, [seed]) for question, seed in zip(questions, seeds)])


# Batches a user sends, each `(question, image seeds)` per sample, in prompts of different lengths: the
# batch-equals-single tests run each one batched and each sample alone.
BATCHES = {
    "two images": [("What is in the picture? Describe it in detail please.", [3]), ("Colour?", [4])],
    "image and shorter text-only": [("What is in the picture? Describe it in detail please.", [3]), ("Hi", [])],
    # the text-only prompt is the longest: the batch's pruned layout is as long as the prompt
    "image and longer text-only": [
        ("Colour?", [4]),
        ("Hello there, how are you doing today? Tell me a long story about the sea, the ships and the wind.", []),
    ],
    "one and two images": [("What is in the picture?", [3]), ("Compare them.", [4, 5])],
}


def generate_with_raw_logits(model, inputs, new_tokens=2, **kwargs):
    """Greedy tokens and each step's last-position logits straight from the LM head (generate's own
    `output_logits` are cast to float32, too coarse for a float64 comparison)."""
    logits = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: logits.append(output[:, -1].detach().clone())
    )
    try:
        sequences = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   **kwargs)
    finally:
        handle.remove()
    return sequences, logits
