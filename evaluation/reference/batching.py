"""Training batches equal to the processor's output, built cheaply on CPU and finished on the GPU.

A DataLoader worker that ran the full processor would spend most of its time making float pixel
tensors (3-4 ms a sample) and ship ~600 KB a sample through shared memory. All SynthVQA images have
the same size, so the processor's text side is fixed (the image placeholder always expands to the same
number of tokens) and its pixel side is rescale + normalise + a fixed patch layout. The `Batcher`
builds the text side with the tokenizer, ships the raw uint8 images (190 KB a sample), and makes
`pixel_values` on the training device. `Batcher.verify` compares every key with the real processor
on real samples; `train.py` runs it first and falls back to the processor when anything differs.
"""

from __future__ import annotations

import numpy as np
import torch

from . import models, synthvqa

KNOWN_KEYS = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_sizes", "batch_num_images",
              "mm_token_type_ids"}


def follow_up_prompt(processor, question: str) -> str:
    """A later user turn (no image), ending where the answer starts."""
    content = [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def training_texts(processor, samples: list[dict], rng=None, suffix_p: float = 0.5) -> tuple[list[str], list[list]]:
    """Chat text of each sample's conversation and the character spans of its answers (with <|im_end|>).

    A sample's "turns" (or its one question) become user/assistant turns, the image in the first;
    half of the questions (with `rng`) end with the short-answer suffix.
    """
    eos = processor.tokenizer.eos_token
    texts, spans = [], []
    for s in samples:
        text, sample_spans = "", []
        for k, (question, answer) in enumerate(s.get("turns") or [(s["question"], s["answers"][0])]):
            if rng is not None and rng.random() < suffix_p:
                question += synthvqa.SHORT_ANSWER
            text += models.chat_prompt(processor, question) if k == 0 else "\n" + follow_up_prompt(processor, question)
            sample_spans.append((len(text), len(text) + len(answer) + len(eos)))
            text += answer + eos
        texts.append(text)
        spans.append(sample_spans)
    return texts, spans


def answer_labels(tokenizer, input_ids: np.ndarray, texts: list[str], spans: list[list]) -> np.ndarray:
    """Labels for a LEFT-padded batch of `texts` (image placeholders expanded): -100 except the answer spans."""
    labels = np.full_like(input_ids, -100)
    for i, (text, answer_spans) in enumerate(zip(texts, spans)):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if input_ids[i, -len(ids):].tolist() != ids:
            raise RuntimeError(f"row {i} of the batch is not the tokenized text {text[:80]!r}...")
        start = input_ids.shape[1] - len(ids)
        for j, (a, b) in enumerate(offsets):
            if any(lo <= a and b <= hi for lo, hi in answer_spans) and b > a:
                labels[i, start + j] = ids[j]
    return labels


class Batcher:
    """Builds `(prompt + answer, image)` training batches for one processor; see the module docstring."""

    def __init__(self, processor, fast: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.qwen = "Qwen2VL" in type(processor).__name__
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        ref_image = synthvqa.make_sample("validation", 0)["image"]
        ref = processor(text=[models.chat_prompt(processor, "x")], images=[ref_image], return_tensors="np")
        ids = ref["input_ids"][0]
        self.n_image_tokens = int((ids == self.image_token_id).sum())
        self.per_image = {k: np.asarray(ref[k][0]) for k in ("image_grid_thw", "image_sizes") if k in ref}
        self.has_num_images = "batch_num_images" in ref
        self.mm_value = None
        if "mm_token_type_ids" in ref:
            values = np.unique(ref["mm_token_type_ids"][0][ids == self.image_token_id])
            self.mm_value = int(values[0]) if len(values) == 1 else None
        self.crops = ref["pixel_values"].shape[1] if not self.qwen else None
        self.fast = fast and set(ref.keys()) <= KNOWN_KEYS and ("mm_token_type_ids" not in ref or self.mm_value)
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.rescale = float(ip.rescale_factor)
        if self.qwen:
            self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size

    # ---------------------------------------------------------------- CPU side (DataLoader workers)

    def cpu_batch(self, samples: list[dict], rng=None) -> dict:
        """A dict of numpy arrays: the processor's text-side keys, `labels`, and `images_u8` (or `pixel_values`)."""
        texts, spans = training_texts(self.processor, samples, rng)
        images = [s["image"] for s in samples]
        expanded = [t.replace(self.image_token, self.image_token * self.n_image_tokens, 1) for t in texts]
        # the expansion comes before every answer: shift the answer spans by its length
        shift = len(self.image_token) * (self.n_image_tokens - 1)
        spans = [[(a + shift, b + shift) for a, b in sample_spans] for sample_spans in spans]
        if self.fast:
            enc = self.tokenizer(expanded, padding=True, padding_side="left", return_tensors="np")
            out = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
            if self.mm_value is not None:
                out["mm_token_type_ids"] = np.where(out["input_ids"] == self.image_token_id, self.mm_value, 0)
            for key, row in self.per_image.items():
                out[key] = np.tile(row, (len(samples), 1))
            if self.has_num_images:
                out["batch_num_images"] = np.ones(len(samples), dtype=np.int64)
            out["images_u8"] = np.stack([np.asarray(im.convert("RGB")) for im in images])
        else:
            out = {k: np.asarray(v) for k, v in
                   self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="np").items()}
            out["pixel_values"] = out["pixel_values"].astype(np.float16)
        out["labels"] = answer_labels(self.tokenizer, out["input_ids"], expanded, spans)
        return out

    # ---------------------------------------------------------------- device side (training process)

    def pixel_values(self, images_u8: torch.Tensor) -> torch.Tensor:
        """The processor's `pixel_values` from a uint8 `[B, H, W, 3]` batch, on its device, float32."""
        x = images_u8.permute(0, 3, 1, 2).float() * self.rescale
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        b, c, h, w = x.shape
        if self.qwen:
            p, m, t = self.patch, self.merge, self.temporal
            gh, gw = h // p, w // p
            x = x.unsqueeze(1).expand(b, t, c, h, w).reshape(b, 1, t, c, gh // m, m, p, gw // m, m, p)
            return x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(b * gh * gw, c * t * p * p)
        return x.unsqueeze(1).expand(b, self.crops, c, h, w).contiguous()

    def to_device(self, batch: dict, device) -> dict:
        out = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}
        if "images_u8" in out:
            out["pixel_values"] = self.pixel_values(out.pop("images_u8"))
        elif out["pixel_values"].dtype == torch.float16:
            out["pixel_values"] = out["pixel_values"].float()
        return out

    def verify(self, samples: list[dict]) -> str | None:
        """None when the fast batch equals the processor's output on `samples`, else what differs."""
        if not self.fast:
            return "the processor returns keys the fast path does not know"
        texts, _ = training_texts(self.processor, samples, None)
        ref = self.processor(text=texts, images=[s["image"] for s in samples], padding=True, padding_side="left",
                             return_tensors="pt")
        mine = self.to_device(self.cpu_batch(samples, None), "cpu")
        mine.pop("labels")
        if set(mine) != set(ref.keys()):
            return f"keys differ: {sorted(mine)} vs {sorted(ref.keys())}"
        for key, value in ref.items():
            a, b = mine[key], value
            if a.shape != b.shape:
                return f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            if key == "pixel_values":
                if not torch.allclose(a, b.float(), atol=1e-5, rtol=0):
                    return f"pixel_values differ by {(a - b).abs().max().item():.2e}"
            elif not torch.equal(a.long(), b.long()):
                return f"{key} differs"
        return None
