"""The evaluation loop: configs x tasks -> predictions (cached), metrics, loyalty, efficiency.

One config is one `vlmcompress.load(...)` argument set. A compressed config is always compared with
the uncompressed baseline of the same model on the same samples (run first, or served by the cache).
Data parallel: each rank generates the samples `doc_id % world == rank`; records are gathered and the
main process scores them exactly as one process would.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from . import efficiency
from .cache import ResponseCache, cache_key
from .data import SampleError, TaskData
from .metrics import agreement
from .sample_requests import BatchSizer, out_of_memory, prompt_identity, with_system_instruction, write_out
from .summary import config_metrics, mean_of_defined
from .tasks import Task
from .tasks.scoring import AGGREGATIONS, loyalty_references, score_sample

log = logging.getLogger("evaluation")

# model_args keys that say which model and how to run it, for every config (the baseline too); everything
# else is compression. cuda_graphs is a decoding path (static decoding), not a compression.
BASE_KEYS = ("pretrained", "dtype", "device_map", "attn_implementation", "cuda_graphs")


# --------------------------------------------------------------------------- configs


def parse_value(text: str):
    """'0.1' -> 0.1, '64' -> 64, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_kv_list(text: str | None) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (lmms-eval's --model_args / --gen_kwargs syntax)."""
    out = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"expected key=value, got {part!r} in {text!r}")
        key, value = part.split("=", 1)
        if key.strip() in out:
            raise ValueError(f"{key.strip()} is given twice in {text!r}: keep one")
        out[key.strip()] = parse_value(value)
    return out


def parse_sweep(items: list[str]) -> list[dict]:
    """['kv=snapkv,pyramidkv', 'kv_budget=0.1,0.4'] -> every combination, as compression dicts."""
    axes = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--sweep items are key=v1,v2,...; got {item!r}")
        key, values = (part.strip() for part in item.split("=", 1))
        if key in axes:
            raise ValueError(f"--sweep gives {key} twice: list all its values in one {key}=v1,v2,...")
        axes[key] = [(key, parse_value(v)) for v in values.split(",") if v.strip()]
        if not key or not axes[key]:
            raise ValueError(f"--sweep {item!r} has an empty key or no value: write key=v1,v2,...")
    return [dict(combo) for combo in itertools.product(*axes.values())] if axes else []


def split_model_args(model_args: dict) -> tuple[dict, dict]:
    base = {k: v for k, v in model_args.items() if k in BASE_KEYS}
    compression = {k: v for k, v in model_args.items() if k not in BASE_KEYS}
    return base, compression


def is_baseline(compression: dict) -> bool:
    return all(compression.get(k) in (None, "none", "None") for k in ("kv", "prune", "sparsity", "quant"))


def run_name(compression: dict) -> str:
    if is_baseline(compression):
        return "baseline"
    return ",".join(f"{k}={v}" for k, v in compression.items() if v is not None)


def build_configs(model_args: dict, sweep: list[dict] | None = None) -> list[dict]:
    """The compression configs to run, baseline first when any config is compressed."""
    base, compression = split_model_args(model_args)
    configs = [dict(compression, **combo) for combo in sweep] if sweep else [compression]
    compressed = [c for c in configs if not is_baseline(c)]
    return [{}] + compressed if compressed or not configs else [{}]


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    tasks: list[Task]
    model_args: dict
    family: str = "auto"
    limit: int | float | None = None  # a count, or a fraction in (0, 1) of each task
    batch_size: int | str = 1          # or "auto" / "auto:N" (BatchSizer)
    gen_kwargs: dict = field(default_factory=dict)
    seed: int | None | tuple = 0      # one seed, or (python, numpy, torch, fewshot), None leaving one unset
    device: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    num_frames: int = 16
    predict_only: bool = False
    progress: bool = True
    rank: int = 0
    world: int = 1
    max_batch_size: int | None = None
    system_instruction: str | None = None
    apply_chat_template: bool = False  # the system instruction as a system turn, not text before the prompt
    write_out: bool = False


def generation_kwargs(task: Task, user: dict, family: str = "default") -> dict:
    """lmms-eval's settings for the task and family: greedy, the task's max_new_tokens (else the lmms-eval
    model's default), and `until` (stop strings cut from the answer) where that model applies them.
    `user` (--gen_kwargs) overrides; temperature 0 means greedy."""
    model = task.lmms_model(family)
    kw = generate_kwargs(task.max_new_tokens or model.max_new_tokens, user)
    until = user.get("until", task.until)
    until = [str(u) for u in until] if isinstance(until, (list, tuple)) else [str(until)]
    if until and not model.chat:
        kw["until"] = until
    return kw


def generate_kwargs(max_new_tokens: int, user: dict) -> dict:
    """What `generate` takes: greedy by default with `max_new_tokens`, `user`'s settings over it (temperature 0
    means greedy); stop strings (`until`) are not generate's, they are cut from the answer."""
    kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    kw.update({k: v for k, v in user.items() if k != "until"})
    if kw.get("temperature") in (0, 0.0):
        kw.pop("temperature")
        kw["do_sample"] = False
    if not kw.get("do_sample"):
        kw.pop("temperature", None)
        kw.pop("top_p", None)
    return kw


def cut_at_stop_strings(text: str, until) -> str:
    """The answer up to the first stop string, stripped (lmms-eval's simple models)."""
    stop = min([text.index(term) for term in until or () if term and term in text], default=len(text))
    return text[:stop].strip()


def seed_parts(seed) -> tuple:
    """(python, numpy, torch, fewshot) seeds from one seed or lmms-eval's list."""
    return tuple(seed) if isinstance(seed, (tuple, list)) else (seed,) * 4


def seed_everything(seed) -> None:
    """Seed python, numpy and torch as lmms-eval does; a None part leaves that generator as it is."""
    python_seed, numpy_seed, torch_seed, _ = seed_parts(seed)
    if python_seed is not None:
        random.seed(python_seed)
    if numpy_seed is not None:
        np.random.seed(numpy_seed)
    if torch_seed is not None:
        torch.manual_seed(torch_seed)


# --------------------------------------------------------------------------- model


class ModelRunner:
    """A loaded (compressed) model with its processor; `generate(samples)` -> [(text, stats)]."""

    def __init__(self, base: dict, compression: dict, device: str | None = None):
        import vlmcompress
        from transformers import AutoConfig, AutoProcessor

        pretrained = base["pretrained"]
        kwargs = {k: v for k, v in base.items() if k != "pretrained"}
        self.model = vlmcompress.load(pretrained, **kwargs, **compression)
        if device and not base.get("device_map"):
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.processor = AutoProcessor.from_pretrained(pretrained)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self.model_type = AutoConfig.from_pretrained(pretrained).model_type

    def prompt(self, sample: dict) -> str:
        if sample.get("content"):  # interleaved, as lmms-eval's doc_to_messages (image parts carry an index)
            content = [{"type": "image"} if part["type"] == "image" else part for part in sample["content"]]
        else:  # the visuals, then the text
            content = [{"type": "image"} for _ in sample["images"]]
            if sample.get("video") is not None:
                content.append({"type": "video"})
            content.append({"type": "text", "text": sample["prompt"]})
        system = [{"role": "system", "content": [{"type": "text", "text": sample["system"]}]}] if sample.get("system") \
            else []
        return self.processor.apply_chat_template([*system, {"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def generate(self, samples: list[dict], gen_kwargs: dict) -> list[tuple[str, dict]]:
        texts = [self.prompt(s) for s in samples]
        images = [im for s in samples for im in s["images"]]
        videos = [s["video"] for s in samples if s.get("video") is not None]
        inputs = self.processor(text=texts, images=images or None, videos=videos or None, padding=True,
                                return_tensors="pt").to(self.device)
        until = gen_kwargs.get("until")
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if k != "until"}
        with torch.inference_mode(), efficiency.Measure(self.device) as measure:
            out = self.model.generate(**inputs, **gen_kwargs, logits_processor=[measure.timer])
        new = out[:, inputs["input_ids"].shape[1]:]
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        stats = efficiency.merge_model_stats(measure.stats, getattr(self.model, "compression_stats", None), len(samples))
        return [(cut_at_stop_strings(d, until), dict(stats)) for d in decoded]

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- one task on one rank


def shard_ids(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def merge_records(parts: list[list[dict]]) -> list[dict]:
    """Records of all ranks in doc_id order (one per doc_id)."""
    by_id = {}
    for part in parts:
        for record in part:
            by_id[record["doc_id"]] = record
    return [by_id[k] for k in sorted(by_id)]


def _record(sample: dict | None, doc_id: int, **extra) -> dict:
    base = {"doc_id": doc_id, "id": None, "prompt": None, "answers": None, "options": None, "meta": {}}
    if sample is not None:
        base.update({k: sample[k] for k in ("id", "prompt", "answers", "options", "meta")})
    base.update(extra)
    return base


def generate_task(runner, data: TaskData, settings: Settings, config: dict, cache: ResponseCache | None,
                  family: str, model_key: dict, bar=None, sizer: BatchSizer | None = None) -> list[dict]:
    """Predictions for this rank's share of `data`: cached ones reused, the rest generated and cached at once.
    `bar` (the run's progress bar) advances by one per sample; `sizer` (made here when None) sets the batch size."""
    from tqdm.auto import tqdm

    task = data.task
    gen = generation_kwargs(task, settings.gen_kwargs, family)
    ids = shard_ids(len(data), settings.rank, settings.world)
    sizer = sizer or BatchSizer(settings.batch_size, settings.max_batch_size, len(ids))
    records: list[dict] = []
    pending: list[tuple[dict, str | None]] = []
    bar = bar if bar is not None else tqdm(disable=True)

    def run_batch(chunk) -> bool:
        """Generate `chunk` (one batch, else one by one); False when it ran out of memory and the size was halved."""
        batch = [s for s, _ in chunk]
        try:
            results = runner.generate(batch, gen) if len(batch) > 1 else None
        except Exception as exc:  # noqa: BLE001 - isolate the failing sample by retrying one by one
            if out_of_memory(exc) and sizer.halve():
                log.info("%s: out of memory at batch size %d, trying %d", task.name, len(batch), sizer.size)
                return False
            log.debug("batch failed, retrying samples one by one", exc_info=True)
            results = None
        for i, (sample, key) in enumerate(chunk):
            if results is not None:
                text, stats = results[i]
            else:
                try:
                    text, stats = runner.generate([sample], gen)[0]
                except Exception as exc:  # noqa: BLE001 - a sample that raises is a counted failure
                    log.warning("%s sample %s (id %s) failed: %s: %s", task.name, sample["doc_id"], sample["id"],
                                type(exc).__name__, exc)
                    log.debug(traceback.format_exc())
                    records.append(_record(sample, sample["doc_id"], error=f"{type(exc).__name__}: {exc}"))
                    bar.update(1)
                    continue
            if cache is not None and key is not None:
                cache.put(key, task.name, sample["doc_id"], config, text, stats)
            records.append(_record(sample, sample["doc_id"], prediction=text, stats=stats, cached=False))
            bar.update(1)
        return True

    def flush():
        while pending:
            chunk = pending[:sizer.size]
            if run_batch(chunk):
                del pending[:len(chunk)]

    for index, doc_id in enumerate(ids):
        if sizer.search_starts(index):  # the samples before it go at the size found so far
            flush()
            sizer.restart()
        try:
            sample = data.sample(doc_id, family)
        except SampleError as exc:
            log.warning("%s sample %s skipped: %s", task.name, doc_id, exc)
            records.append(_record(None, doc_id, error=str(exc)))
            bar.update(1)
            continue
        sample = with_system_instruction(sample, settings.system_instruction, settings.apply_chat_template)
        key = None
        if cache is not None:
            key = cache_key(model_key, config, task.name, doc_id, prompt_identity(sample), gen)
            hit = cache.get(key)
            if hit is not None:
                text, stats = hit
                records.append(_record(sample, doc_id, prediction=text, stats=dict(stats, cached=True), cached=True))
                bar.update(1)
                continue
        pending.append((sample, key))
        if len(pending) >= sizer.size:
            flush()
    flush()
    return sorted(records, key=lambda r: r["doc_id"])


# --------------------------------------------------------------------------- scoring


def score_task(task: Task, records: list[dict], baseline: list[dict] | None = None, predict_only: bool = False,
               seed: int = 0) -> dict:
    """Metrics, loyalty to `baseline` (records of the uncompressed run) and efficiency of one task.

    Samples are scored in doc_id order with one `random.Random(seed)` per pass, so MMMU's random
    fallback draws the letters lmms-eval draws after `random.seed(seed)` (its `--seed` default is 0).
    """
    ok = [r for r in records if r.get("error") is None]
    failures = [{"doc_id": r["doc_id"], "id": r["id"], "error": r["error"]} for r in records if r.get("error")]
    out = {"n_samples": len(records), "n_scored": len(ok), "failures": len(failures), "failed_samples": failures,
           "efficiency": efficiency.aggregate([r["stats"] for r in ok])}
    if predict_only:
        return out
    rng = random.Random(seed)
    scored = []
    for r in ok:
        r["scores"] = score_sample(task, r["prediction"], r["answers"], r, rng)
        scored.append((r, r["scores"]))
    out["metrics"] = AGGREGATIONS[task.aggregation](task, scored) if scored else {}
    key = task.sample_score_key
    out["accuracy"] = mean(s[key] for _, s in scored) if scored else None
    out["primary"] = {"name": task.primary, "value": out["metrics"].get(task.primary)}
    if baseline is not None:
        base_by_id = {b["doc_id"]: b for b in baseline if b.get("error") is None}
        pairs = [(r, base_by_id[r["doc_id"]]) for r in ok if r["doc_id"] in base_by_id]
        loyal = []
        baseline_rng, rng = random.Random(seed), random.Random(seed)
        for r, b in pairs:
            refs = loyalty_references(task, b["prediction"], r, baseline_rng)
            r["loyalty"] = score_sample(task, r["prediction"], refs, r, rng)
            r["agreement"] = agreement(r["prediction"], b["prediction"])
            r["baseline_prediction"] = b["prediction"]
            loyal.append((r, r["loyalty"]))
        out["loyalty_samples"] = len(pairs)
        out["loyalty"] = mean(s[key] for _, s in loyal) if loyal else None
        out["loyalty_metrics"] = AGGREGATIONS[task.aggregation](task, loyal) if loyal else {}
        out["agreement"] = mean(r["agreement"] for r, _ in pairs) if pairs else None
        base_eff = efficiency.aggregate([b["stats"] for _, b in pairs])
        out["efficiency"].update(efficiency.relative(out["efficiency"], base_eff))
    return out


def summarize_run(task_results: dict, baseline_tasks: dict | None = None) -> dict:
    """Cross-task means for one config (accuracy, loyalty, agreement, efficiency) and EffiVLM-Bench's OP, OL,
    OE against the baseline's task results (evaluation/summary.py)."""
    res = list(task_results.values())
    summary = {
        "accuracy": mean_of_defined(t.get("accuracy") for t in res),
        "loyalty": mean_of_defined(t.get("loyalty") for t in res),
        "agreement": mean_of_defined(t.get("agreement") for t in res),
        "failures": sum(t["failures"] for t in res),
        "n_samples": sum(t["n_samples"] for t in res),
    }
    for key in ("kv_bytes", "latency_s", "ttft_s", "prefill_s", "decode_s_per_token", "visual_tokens",
                "prompt_tokens", "kv_bytes_ratio", "speedup"):
        summary[key] = mean_of_defined(t["efficiency"].get(key) for t in res)
    peaks = [t["efficiency"].get("peak_memory_bytes") for t in res if t["efficiency"].get("peak_memory_bytes")]
    summary["peak_memory_bytes"] = max(peaks) if peaks else None
    summary.update(config_metrics(task_results, baseline_tasks))
    return summary


# --------------------------------------------------------------------------- everything


def gather(records: list[dict], world: int) -> list[dict]:
    if world <= 1:
        return records
    from accelerate.utils import gather_object

    return merge_records([gather_object(records)])


def model_key(base: dict) -> dict:
    pretrained = str(base["pretrained"])
    if os.path.isdir(pretrained):
        pretrained = str(Path(pretrained).resolve())
    return {"pretrained": pretrained, **{k: str(v) for k, v in base.items() if k != "pretrained"}}


def evaluate(settings: Settings, configs: list[dict], on_run_done=None, runner_factory=ModelRunner) -> list[dict]:
    """Run every config over every task; returns one result dict per config (baseline first)."""
    from tqdm.auto import tqdm

    base, _ = split_model_args(settings.model_args)
    if "pretrained" not in base:
        raise ValueError("--model_args needs pretrained=<hub id or folder>")
    cache = ResponseCache(settings.cache_dir) if settings.cache_dir else None
    mkey = model_key(base)
    datas = {}
    for task in settings.tasks:
        try:
            datas[task.name] = TaskData(task, settings.data_dir, settings.limit, settings.num_frames)
        except Exception as exc:  # noqa: BLE001 - a task that cannot load is reported, others go on
            log.error("task %s cannot be loaded: %s", task.name, exc)
            datas[task.name] = exc
    baseline_records: dict[str, list[dict]] = {}
    runs = []
    # scoring's generator (MMMU's random fallback) follows the python seed; unset, one draw serves every pass
    score_seed = seed_parts(settings.seed)[0]
    score_seed = random.SystemRandom().randrange(2**32) if score_seed is None else score_seed
    # one bar for the whole run: configs x this rank's samples, with its ETA
    per_config = sum(len(shard_ids(len(d), settings.rank, settings.world)) for d in datas.values()
                     if not isinstance(d, Exception))
    bar = tqdm(total=len(configs) * per_config, unit="sample", disable=not settings.progress, dynamic_ncols=True)
    for config in configs:
        name = run_name(config)
        bar.set_description(name)
        done_before = bar.n
        run = {"name": name, "compression": config, "baseline": is_baseline(config), "tasks": {}, "error": None,
               "records": {}}
        runner = None
        try:
            seed_everything(settings.seed)
            runner = runner_factory(base, config, settings.device)
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown method: this config fails, the sweep goes on
            run["error"] = f"{type(exc).__name__}: {exc}"
            log.error("config %s cannot be loaded: %s", name, run["error"])
        if runner is not None:
            family = settings.family if settings.family not in (None, "auto") else runner.model_type
            for task in settings.tasks:
                data = datas[task.name]
                if isinstance(data, Exception):
                    run["tasks"][task.name] = {"error": f"{type(data).__name__}: {data}", "n_samples": 0, "failures": 0,
                                               "efficiency": {}}
                    continue
                if settings.write_out and not runs and settings.rank == 0:
                    write_out(data, settings, family)
                seed_everything(settings.seed)
                sizer = BatchSizer(settings.batch_size, settings.max_batch_size,
                                   len(shard_ids(len(data), settings.rank, settings.world)))
                records = generate_task(runner, data, settings, config, cache, family, mkey, bar, sizer)
                records = gather(records, settings.world)
                if run["baseline"]:
                    baseline_records[task.name] = records
                compare = None if run["baseline"] else baseline_records.get(task.name)
                run["tasks"][task.name] = score_task(task, records, compare, settings.predict_only, score_seed)
                run["tasks"][task.name]["batch_sizes"] = sizer.sizes
                run["records"][task.name] = records
            runner.close()
        bar.update(done_before + per_config - bar.n)  # a config that failed to load skips its samples
        baseline_tasks = next((r["tasks"] for r in runs if r["baseline"] and not r["error"]), None)
        run["summary"] = summarize_run({k: v for k, v in run["tasks"].items() if "error" not in v},
                                       None if run["baseline"] else baseline_tasks)
        runs.append(run)
        if on_run_done is not None:
            on_run_done(runs)
    bar.close()
    if cache is not None:
        cache.close()
    return runs
