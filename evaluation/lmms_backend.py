"""`--model vlmcompress` for lmms-eval: any lmms-eval task on a compressed model, with efficiency and loyalty.

    python -m lmms_eval --model vlmcompress \\
        --model_args pretrained=PATH,kv=snapkv,kv_budget=0.1,prune=visionzip,prune_budget=0.25 \\
        --tasks textvqa_val --batch_size 4 --output_path results/ --log_samples

lmms-eval finds the backend through its `lmms_eval.models` entry points (vlmcompress/integrations/lmms_eval.py;
`pip install -e ".[lmms]"`). Loading, prompts (the processor's chat template, visuals first), generation
and the per-call measurement are `evaluation.runner.ModelRunner`'s, the code `evaluation/run.py` runs,
so a task both define gets the same predictions from both. Per sample, the backend writes the
efficiency (TTFT, decode tokens/s, KV bytes, visual tokens, ...) and, given `baseline_samples=` (the
`--log_samples` output of an uncompressed run), loyalty to it, into
`<output_path>/<model>/<date>_efficiency_<task>.jsonl` beside lmms-eval's results, and the means per
task into `<date>_efficiency.json`. See docs/lmms_eval.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from . import efficiency
from .data import load_video_frames
from .metrics import agreement
from .runner import ModelRunner, cut_at_stop_strings, generate_kwargs, parse_value, split_model_args
from .tasks import TASKS
from .tasks.formats import TARGETS, options_list
from .tasks.scoring import loyalty_references, score_sample

# lmms-eval generation_kwargs that `generate` takes; the others (`until`, `image_aspect_ratio`, ...) are
# handled here or meant for other backends
GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")
DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's Qwen2-VL backend's default, for a task that sets none
SAMPLES_FILE = re.compile(r"_samples_(?P<task>.+)\.jsonl$")
EFFICIENCY_FILE = re.compile(r"^(?P<date>.+?)_efficiency_(?P<task>.+?)(_rank\d+)?\.jsonl$")


# --------------------------------------------------------------------------- arguments


def parse_batch_size(value) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"the vlmcompress backend takes --batch_size N (an integer >= 1), not {value!r}")
    return int(text)


def cli_output_path(argv: list[str] | None = None) -> str | None:
    """lmms-eval's `--output_path` on this process's command line (lmms-eval does not tell the model)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def results_folder(output_path: str | None, pretrained: str) -> Path | None:
    """The folder lmms-eval writes this model's results to: `<output_path>/<sanitized model name>`."""
    return Path(output_path) / lmms_utils.sanitize_model_name(str(pretrained)) if output_path else None


def _response(record: dict) -> str:
    """A samples-file record's raw response (`resps`, or `filtered_resps` when lmms-eval dropped equal `resps`)."""
    value = record["resps"] if "resps" in record else record["filtered_resps"]
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return str(value)


def read_baseline_samples(path: str | os.PathLike) -> dict[str, dict[int, str]]:
    """{task: {doc_id: response}} from an lmms-eval samples file (`<date>_samples_<task>.jsonl`, written by
    `--log_samples`) or a folder holding them (searched recursively; the newest file of each task wins)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*_samples_*.jsonl"), key=lambda p: p.name)  # names start with the date
        if not files:
            raise ValueError(f"baseline_samples={path}: the folder holds no lmms-eval samples file "
                             "(<date>_samples_<task>.jsonl, written with --log_samples)")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"baseline_samples={path}: no such file or folder")
    out = {}
    for file in files:
        match = SAMPLES_FILE.search(file.name)
        if match is None:
            raise ValueError(f"baseline_samples={file}: not an lmms-eval samples file (<date>_samples_<task>.jsonl)")
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        out[match["task"]] = {int(r["doc_id"]): _response(r) for r in records}
    return out


def read_baseline_efficiency(path: str | os.PathLike) -> dict[str, list[dict]]:
    """{task: rows} of the per-sample efficiency files a baseline run of this backend wrote beside its samples
    (the newest run of each task, every rank); {} for a baseline run by another backend."""
    path = Path(path)
    runs = defaultdict(lambda: defaultdict(list))  # task -> date -> files
    for file in (path if path.is_dir() else path.parent).rglob("*_efficiency_*.jsonl"):
        match = EFFICIENCY_FILE.search(file.name)
        if match is not None:
            runs[match["task"]][match["date"]].append(file)
    return {task: [json.loads(line) for file in by_date[max(by_date)] for line in file.read_text().splitlines()
                   if line.strip()]
            for task, by_date in runs.items()}


# --------------------------------------------------------------------------- per-sample records


def task_loyalty(task, prediction: str, baseline: str, doc: dict) -> float:
    """`evaluation/run.py`'s loyalty: the task's scorer with the baseline's answer as the reference."""
    try:
        answers = TARGETS[task.target](task, doc)
    except (ValueError, TypeError, KeyError):  # a split without references (test-dev): only some scorers need them
        answers = []
    sample = {"answers": answers, "options": options_list(task, doc) if task.options else None,
              "meta": {k: doc.get(k) for k in task.meta_fields}}
    # MMMU's random fallback draws from a seeded generator, as `runner.score_task` does
    references = loyalty_references(task, baseline, sample, random.Random(0))
    return score_sample(task, prediction, references, sample, random.Random(0))[task.sample_score_key]


def summarize(rows: list[dict], baseline_rows: list[dict] | None = None) -> dict:
    """Means over one task's records: efficiency (efficiency.aggregate, with the KV-bytes ratio and speedup
    over the baseline's rows of the same samples), loyalty and agreement where measured."""
    eff = efficiency.aggregate(rows)
    step = eff.get("decode_s_per_token")
    eff["decode_tokens_per_s"] = 1.0 / step if step else None
    if baseline_rows:
        ids = {r["doc_id"] for r in rows}
        eff.update(efficiency.relative(eff, efficiency.aggregate([b for b in baseline_rows if b["doc_id"] in ids])))
    out = {"n_samples": len(rows), "efficiency": eff}
    for key in ("loyalty", "agreement"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = mean(values) if values else None
        out[f"{key}_samples"] = len(values)
    return out


def _visuals(value) -> list:
    """doc_to_visual's result as a flat list ([[img]] and a bare image both occur)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        return [value]
    return [v for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]


# --------------------------------------------------------------------------- the backend


class VlmCompress(lmms):
    """lmms-eval's simple-model interface (doc_to_text + doc_to_visual) over `vlmcompress.load`.

    model_args: `pretrained` and every `vlmcompress.load` argument (`kv`, `kv_budget`, `prune`, `prune_budget`,
    `sparsity`, ..., `dtype`, `device_map`, `attn_implementation`, `cuda_graphs`, method options), plus
    `baseline_samples` (a samples file or folder of an uncompressed run, for loyalty), `output_path`
    (default: lmms-eval's `--output_path`) and `num_frames` (frames sampled per video, 16). lmms-eval also
    passes `max_batch_size`, which only `--batch_size auto` uses; this backend refuses `auto`.
    """

    is_simple = True

    def __init__(self, pretrained: str, batch_size=1, max_batch_size=None, device: str | None = None,
                 num_frames: int = 16, baseline_samples: str | None = None, output_path: str | None = None,
                 **model_args) -> None:
        super().__init__()
        # everything that can be wrong with the arguments fails here, before the weights load
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.num_frames = int(num_frames)
        self.baseline = read_baseline_samples(baseline_samples) if baseline_samples else {}
        self.baseline_efficiency = read_baseline_efficiency(baseline_samples) if baseline_samples else {}
        self.folder = results_folder(output_path or cli_output_path(), pretrained)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        else:
            logger.warning("vlmcompress: no --output_path, so per-sample efficiency and loyalty are only logged")
        self.date = lmms_utils.get_datetime_str()
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device in (None, "cuda") and torch.cuda.is_available():  # one GPU per process under accelerate launch
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        device = device or "cpu"
        typed = {k: parse_value(v) if isinstance(v, str) else v for k, v in model_args.items()}  # 'none' -> None
        base, compression = split_model_args({"pretrained": str(pretrained), **typed})
        self.runner = ModelRunner(base, compression, device)
        self._device = self.runner.device
        self.rows: dict[str, list[dict]] = defaultdict(list)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # ---------------------------------------------------------------- generation

    def _sample(self, args) -> dict:
        """ModelRunner's sample (prompt, images, video) for one request."""
        context, _, doc_to_visual, doc_id, task, split = args
        visuals = _visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        images = [v for v in visuals if isinstance(v, Image.Image)]
        videos = [v for v in visuals if isinstance(v, (str, os.PathLike))]
        if len(images) + len(videos) != len(visuals) or len(videos) > 1:
            kinds = sorted({type(v).__name__ for v in visuals})
            raise ValueError(f"task {task}: the vlmcompress backend reads images and one video file per sample; "
                             f"doc {doc_id} gives {kinds}")
        video = load_video_frames(videos[0], self.num_frames) if videos else None
        # the chat template places the visuals; lmms-eval's placeholders would be read as text
        return {"prompt": context.replace("<image>", ""), "images": images, "video": video}

    def generate_until(self, requests) -> list[str]:
        # longest prompts first (lmms-eval's convention: a memory error shows at once); one generation setting a batch
        collator = lmms_utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        texts = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen = dict(chunk[0][1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            user = {k: v for k, v in gen.items() if k in GENERATE_KEYS}
            if (user.get("temperature") or 0) > 0:  # lmms-eval's backends sample when the temperature is above 0
                user.setdefault("do_sample", True)
            kwargs = generate_kwargs(user.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), user)
            outputs = self.runner.generate([self._sample(args) for args in chunk], kwargs)
            batch = []
            for args, (text, stats) in zip(chunk, outputs):
                text = cut_at_stop_strings(text, until)
                texts.append(text)
                batch.append(self._record(args, text, stats))
            self._write_rows(batch)
            bar.update(len(chunk))
        bar.close()
        self._write_summary()
        return collator.get_original(texts)

    def _record(self, args, text: str, stats: dict) -> dict:
        _, _, _, doc_id, task, split = args
        step = stats.get("decode_s_per_token")
        row = {"task": task, "doc_id": doc_id, "prediction": text, **stats,
               "decode_tokens_per_s": 1.0 / step if step else None}
        baseline = self.baseline.get(task, {}).get(int(doc_id))
        if baseline is not None:
            row["baseline_prediction"] = baseline
            row["agreement"] = agreement(text, baseline)
            if task in TASKS:
                row["loyalty"] = task_loyalty(TASKS[task], text, baseline, self.task_dict[task][split][doc_id])
        self.rows[task].append(row)
        return row

    # ---------------------------------------------------------------- outputs

    def _path(self, stem: str, suffix: str) -> Path:
        rank = f"_rank{self.rank}" if self.world_size > 1 else ""
        return self.folder / f"{self.date}_{stem}{rank}{suffix}"

    def _write_rows(self, rows: list[dict]) -> None:
        """Appended as each batch finishes, so an interrupted run keeps what it measured."""
        if self.folder is None:
            return
        by_task = defaultdict(list)
        for row in rows:
            by_task[row["task"]].append(json.dumps(row) + "\n")
        for task, lines in by_task.items():
            with open(self._path(f"efficiency_{task}", ".jsonl"), "a", encoding="utf-8") as f:
                f.writelines(lines)

    def _write_summary(self) -> None:
        summary = {task: summarize(rows, self.baseline_efficiency.get(task)) for task, rows in self.rows.items()}
        for task, s in summary.items():
            logger.info(f"vlmcompress {task}: {json.dumps({k: v for k, v in s.items() if k != 'efficiency'})} "
                        f"efficiency {json.dumps(s['efficiency'])}")
        if self.folder is None:
            return
        path = self._path("efficiency", ".json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)

    # ---------------------------------------------------------------- what the backend does not do

    def loglikelihood(self, requests):
        tasks = ", ".join(sorted({r.task_name for r in requests}))
        raise NotImplementedError(
            f"task(s) {tasks} score answers by log-likelihood (output_type loglikelihood / multiple_choice); the "
            "vlmcompress backend generates (generate_until), where KV eviction and token pruning act. Run a "
            "generate_until variant of the task, or the uncompressed model with lmms-eval's own backend.")

    def generate_until_multi_round(self, requests):
        tasks = ", ".join(sorted({r.task_name for r in requests}))
        raise NotImplementedError(f"task(s) {tasks} are multi-round (generate_until_multi_round), which the "
                                  "vlmcompress backend does not run; it runs generate_until tasks.")

    def clean(self) -> None:
        self.runner.close()
        super().clean()
