"""Latency and memory of one `generate` call, and their aggregation.

Time to first token comes from a LogitsProcessor stamp: its first call happens right after the
prefill forward pass has produced the first logits. On CUDA every stamp synchronises first.
"""

from __future__ import annotations

import resource
import sys
import time
from statistics import mean

import torch
from transformers import LogitsProcessor


class StepTimer(LogitsProcessor):
    """Records a timestamp at every decoding step (it never changes the scores)."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.stamps: list[float] = []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.stamps.append(self.now())
        return scores


def rss_peak_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Measure:
    """Context for one generate call: `with Measure(device) as m: out = model.generate(..., logits_processor=[m.timer])`."""

    def __init__(self, device):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timer = StepTimer(self.device)
        self.stats: dict = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.timer.now()
        return self

    def __exit__(self, *exc):
        end = self.timer.now()
        stamps = self.timer.stamps
        total = end - self.start
        ttft = (stamps[0] - self.start) if stamps else total
        steps = len(stamps)
        self.stats = {
            "latency_s": total,
            "ttft_s": ttft,
            "prefill_s": ttft,
            "decode_s_per_token": (end - stamps[0]) / (steps - 1) if steps > 1 else None,
            "generated_tokens": steps,
        }
        if self.device.type == "cuda":
            self.stats["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.stats["peak_memory_bytes"] = None  # n/a on CPU: see rss_peak_bytes
            self.stats["rss_peak_bytes"] = rss_peak_bytes()
        return False


EFFICIENCY_KEYS = ("latency_s", "ttft_s", "prefill_s", "decode_s_per_token", "generated_tokens", "kv_bytes",
                   "prompt_tokens", "visual_tokens", "peak_memory_bytes", "rss_peak_bytes")
MAX_KEYS = ("peak_memory_bytes", "rss_peak_bytes")


def merge_model_stats(measured: dict, compression_stats: dict | None, batch_size: int) -> dict:
    """Per-sample efficiency: our timings plus the model's `compression_stats` (shared out over the batch)."""
    out = dict(measured)
    stats = compression_stats or {}
    if stats.get("kv_bytes") is not None:
        out["kv_bytes"] = stats["kv_bytes"] / batch_size
    for key in ("prompt_tokens", "visual_tokens"):
        if stats.get(key) is not None:
            out[key] = stats[key]
    if stats.get("prefill_seconds") is not None:  # the model's own prefill clock wins over the stamp
        out["prefill_s"] = stats["prefill_seconds"]
    out["batch_size"] = batch_size
    return out


def aggregate(per_sample: list[dict]) -> dict:
    """Means (maxima for peak memory) over the samples that report each key; None when none does."""
    out = {}
    for key in EFFICIENCY_KEYS:
        values = [s[key] for s in per_sample if s.get(key) is not None]
        if not values:
            out[key] = None
        else:
            out[key] = max(values) if key in MAX_KEYS else mean(values)
    out["samples_measured"] = sum(1 for s in per_sample if not s.get("cached"))
    return out


def relative(measured: dict, baseline: dict) -> dict:
    """KV bytes as a share of the baseline's and the speedup over it, from two aggregates (where both exist)."""
    out = {}
    if baseline.get("kv_bytes") and measured.get("kv_bytes") is not None:
        out["kv_bytes_ratio"] = measured["kv_bytes"] / baseline["kv_bytes"]
    if baseline.get("latency_s") and measured.get("latency_s") is not None:
        out["speedup"] = baseline["latency_s"] / measured["latency_s"]
    return out
