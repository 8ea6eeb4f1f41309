"""The embedded default run (`python evaluation/run.py` with no arguments): no network, a few CPU minutes.

Everything the default uses is set here, in one place (`DEFAULT`):

- When a trained SynthVQA reference checkpoint exists (`CHECKPOINTS/<arch>/model.safetensors`, the
  first of `DEFAULT["reference"]["archs"]` found; Qwen2-VL first), the run uses it on a balanced
  subset of the SynthVQA test split: the baseline, every KV-cache method and every visual-token
  pruning method at a few budgets. The keys of `DEFAULT["reference"]` replace the top-level ones.
- Otherwise (or with `DEFAULT["reference"] = None`) it runs what it always did: a tiny random-weight
  model built by vlmcompress.testing on small local copies of a few benchmarks. Its accuracies are
  meaningless; the printed header says so.

Results (results.json, results.md, pareto.png) go to `./results/` of the working folder (env
VLMCOMPRESS_EVAL_HOME names another), with the response cache in its `cache/` (one per checkpoint
and benchmark generator, so a retrained checkpoint or a changed generator is not served stale
answers). SynthVQA is drawn by its builder at each run; the tiny fallback's model and local data
copies are built once under `models/` and `data/` of the same folder.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

DEFAULT_HOME = "results"  # relative to the working folder, where a user looks for results
# where evaluation/reference/train.py's checkpoints are copied (evaluation/reference/README.md)
CHECKPOINTS = Path(__file__).resolve().parent / "reference" / "checkpoints"


def grid(kind: str, methods: dict[str, dict], budgets: list[float]) -> list[dict]:
    """Every method at every budget: kind "kv" -> {"kv": m, "kv_budget": b, **options}, same for "prune"."""
    return [{kind: method, f"{kind}_budget": budget, **options} for method, options in methods.items()
            for budget in budgets]


DEFAULT = {
    # --- the fallback (no trained checkpoint): today's tiny random-weight model -----------------------------
    # "tiny:<arch>" builds a random-weight checkpoint with vlmcompress.testing; any other value is a
    # hub id or folder passed to vlmcompress.load as is.
    "model": "tiny:qwen2_vl",
    "tasks": ["docvqa_val", "chartqa", "scienceqa_img", "mme"],
    "samples_per_task": 8,
    "configs": [
        {"kv": "streamingllm", "kv_budget": 0.5},
        {"kv": "h2o", "kv_budget": 0.5},
        {"kv": "snapkv", "kv_budget": 0.25, "window_size": 8},
        {"kv": "snapkv", "kv_budget": 0.5, "window_size": 8},
        {"kv": "pyramidkv", "kv_budget": 0.5, "window_size": 8},
        {"kv": "vlcache", "kv_budget": 0.5, "window_size": 8},
    ],
    # tried only when the installed vlmcompress has visual-token pruning
    "prune_configs": [{"prune": "visionzip", "prune_budget": 0.5}],
    "gen_kwargs": {"max_new_tokens": 8},
    "batch_size": 2,
    "seed": 0,
    # --- with a trained reference checkpoint: these keys replace the ones above ---------------------------
    "reference": {
        "archs": ["qwen2_vl", "llava_onevision"],  # the first with CHECKPOINTS/<arch>/model.safetensors wins
        "tasks": ["synthvqa"],
        # the first N test questions; the split cycles through the 5 question types, so N=50 is 10 of each
        "samples_per_task": 50,
        # the question-aware methods look at the last 16 prompt tokens (the question; what the
        # reference tests use); the short prompts are ~120 tokens, the long-context ones ~300
        "configs": grid("kv", {"streamingllm": {}, "h2o": {}, "snapkv": {"window_size": 16},
                               "pyramidkv": {"window_size": 16}, "vlcache": {"window_size": 16},
                               "random": {"window_size": 16}, "lookm": {}},
                        [0.1, 0.2, 0.5])
        # merging (`merge=`) on the question-aware method: what it adds at the smallest budgets
        + grid("kv", {"snapkv": {"window_size": 16, "merge": "pivotal"}}, [0.1, 0.2])
        # AdaKV's head-adaptive budgets over SnapKV's scores, beside snapkv@0.2
        + [{"kv": "snapkv", "kv_budget": 0.2, "window_size": 16, "head_adaptive": True}],
        "prune_configs": grid("prune", {"fastv": {}, "visionzip": {}, "prumerge": {}, "prumerge+": {}},
                              [0.25, 0.5]),
        "gen_kwargs": {"max_new_tokens": 8},
        "batch_size": 10,
    },
}


# --------------------------------------------------------------------------- choosing the checkpoint


def find_checkpoint(archs, checkpoints: str | Path | None = None) -> tuple[str, Path] | None:
    """(arch, folder) of the first arch with a trained checkpoint under `checkpoints`, or None."""
    root = Path(checkpoints if checkpoints is not None else CHECKPOINTS)
    for arch in archs:
        if (root / arch / "model.safetensors").is_file():
            return arch, root / arch
    return None


def resolve(spec: dict | None = None, checkpoints: str | Path | None = None) -> dict:
    """The spec the default runs: the reference one when a checkpoint is found, else the fallback.

    Returns the spec's keys plus "mode" ("reference" or "tiny"), "arch" and, for the reference mode,
    "model" set to the checkpoint folder.
    """
    spec = DEFAULT if spec is None else spec
    base = {k: v for k, v in spec.items() if k != "reference"}
    reference = spec.get("reference")
    root = Path(checkpoints if checkpoints is not None else CHECKPOINTS)
    found = find_checkpoint(reference["archs"], root) if reference else None
    if found is None:
        model = str(base["model"])
        arch = model.split(":", 1)[1] if model.startswith("tiny:") else None
        mode = "tiny" if model.startswith("tiny:") else "model"
        searched = [str(root / a / "model.safetensors") for a in (reference or {}).get("archs", [])]
        return dict(base, mode=mode, arch=arch, searched=searched)
    arch, folder = found
    out = dict(base, **{k: v for k, v in reference.items() if k != "archs"})
    return dict(out, model=str(folder), mode="reference", arch=arch, searched=[])


# --------------------------------------------------------------------------- fingerprints (cache validity)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def data_fingerprint(tasks) -> str:
    """The source of the generators of builder tasks (SynthVQA): a changed benchmark invalidates the copies."""
    from .tasks.synthetic import builder

    parts = []
    for name in tasks:
        build = builder(name)
        if build is not None:
            parts.append(inspect.getsource(inspect.getmodule(build)))
    return _sha("\n".join(parts).encode()) if parts else ""


# --------------------------------------------------------------------------- the header


def _configs_text(configs: list[dict]) -> str:
    groups: dict[tuple[str, str], list] = {}
    for c in configs:
        kind = "kv" if c.get("kv") else "prune" if c.get("prune") else "other"
        method = (c.get(kind, "?") + (f"+merge={c['merge']}" if c.get("merge") else "")
                  + ("+head_adaptive" if c.get("head_adaptive") else ""))
        groups.setdefault((kind, method), []).append(c.get(f"{kind}_budget"))
    kv = [f"{m}@{'/'.join(str(b) for b in bs)}" for (k, m), bs in groups.items() if k == "kv"]
    prune = [f"{m}@{'/'.join(str(b) for b in bs)}" for (k, m), bs in groups.items() if k == "prune"]
    parts = [f"{sum(1 for c in configs if c.get('kv'))} KV ({', '.join(kv)})"] if kv else []
    parts += [f"{sum(1 for c in configs if c.get('prune'))} pruning ({', '.join(prune)})"] if prune else []
    return "baseline + " + " + ".join(parts) if parts else "baseline"


def header(d: dict) -> str:
    lines = ["=" * 100, "vlmcompress evaluation: the embedded default (no arguments; everything set in evaluation/default.py)"]
    if d["mode"] == "reference":
        lines.append(f"  model:   TRAINED SynthVQA reference checkpoint, {d['arch']} ({d['pretrained']})")
        n = d["samples_per_task"]
        lines.append(f"  tasks:   {', '.join(d['tasks'])}: the first {n} test questions"
                     + (" (balanced over the 5 question types)" if n % 5 == 0 else ""))
    else:
        missing = ", ".join(d["searched"]) or "reference checkpoints disabled"
        if d["mode"] != "tiny":
            lines.append(f"  model:   {d['pretrained']} (no trained reference checkpoint: {missing})")
        else:
            lines.append(f"  model:   TINY RANDOM-WEIGHT {d['arch']} model: no trained reference checkpoint was found "
                         f"({missing})")
            lines.append("           -> accuracies are meaningless (about 0); only the machinery and the efficiency columns "
                         "mean something. Train one: evaluation/reference/README.md")
        lines.append(f"  tasks:   {', '.join(d['tasks'])} (synthetic offline copies, {d['samples_per_task']} samples each)")
    lines.append(f"  configs: {_configs_text(d['configs'])}")
    lines.append(f"  output:  {d['output_path']} (results.json, results.md, pareto.png); cache {d['cache_dir']}")
    lines.append("=" * 100)
    return "\n".join(lines)


# --------------------------------------------------------------------------- prepare


def prepare(home: str | Path | None = None, spec: dict | None = None, checkpoints: str | Path | None = None,
            echo: bool = True) -> dict:
    """Choose the model (trained reference checkpoint, else a tiny one built once), write the local
    datasets, print the header; returns the run's arguments."""
    d = resolve(DEFAULT if spec is None else spec, checkpoints)
    home = Path(home or os.environ.get("VLMCOMPRESS_EVAL_HOME") or DEFAULT_HOME)
    model = d["model"]
    cache_dir = home / "cache"
    if d["mode"] == "tiny":
        model_dir = home / "models" / d["arch"]
        if not (model_dir / "vlmcompress_tiny.json").exists():
            from vlmcompress.testing import save_tiny_model

            save_tiny_model(d["arch"], model_dir)
        model = str(model_dir)
    from .tasks.synthetic import builder, write_local_dataset

    # tasks with a builder (SynthVQA) draw their rows at each run; the others get small local copies
    copies = [name for name in d["tasks"] if builder(name) is None]
    data_dir = home / "data" if copies else None
    if copies:
        stamp = data_dir / "default.json"
        wanted = {"tasks": copies, "n": d["samples_per_task"]}
        if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
            for name in copies:
                write_local_dataset(name, data_dir, n=d["samples_per_task"])
            stamp.write_text(json.dumps(wanted))
    if d["mode"] == "reference":
        # answers cached for another checkpoint or another benchmark generator are not reused
        data_fp = data_fingerprint(d["tasks"])
        cache_dir = home / "cache" / f"{d['arch']}-{file_fingerprint(Path(model) / 'model.safetensors')}-{data_fp}"
    # a config whose method is unknown fails on its own in the runner, as on the command line
    configs = list(d["configs"]) + list(d.get("prune_configs", []))
    out = {"pretrained": model, "data_dir": data_dir and str(data_dir), "tasks": d["tasks"], "configs": configs,
           "limit": d["samples_per_task"], "gen_kwargs": d["gen_kwargs"], "batch_size": d["batch_size"],
           "seed": d["seed"], "cache_dir": str(cache_dir), "output_path": str(home), "mode": d["mode"],
           "arch": d["arch"],
           "samples_per_task": d["samples_per_task"], "searched": d["searched"]}
    out["header"] = header(out)
    if echo:
        print(out["header"], flush=True)
    return out
