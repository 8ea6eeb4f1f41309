"""Evaluate compressed vision-language models: accuracy, loyalty to the uncompressed model, efficiency.

    python evaluation/run.py                      # embedded offline default (tiny model, local data)
    python evaluation/run.py --tasks list
    python evaluation/run.py --model qwen2_vl \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,kv=snapkv,kv_budget=0.1 \\
        --tasks docvqa_val,chartqa --limit 100 --batch_size 4 --output_path results/ \\
        --log_samples --use_cache results/cache --gen_kwargs max_new_tokens=32 --seed 0 --device cuda
    python evaluation/run.py --model_args pretrained=PATH --tasks mme \\
        --sweep kv=snapkv,pyramidkv,vlcache kv_budget=0.01,0.1,0.4 --output_path results/
    accelerate launch evaluation/run.py ...       # data parallel: samples sharded by rank

Every argument is checked before any model is loaded. Exit status: 0 when every requested
(task, config) pair scored all its samples; 1 when some sample failed or some pair scored none
(the last line counts them); 2 for a bad argument (one line that names the fix).
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import report  # noqa: E402
from evaluation.runner import Settings, evaluate, run_name  # noqa: E402
from evaluation.tasks import TASKS  # noqa: E402
from evaluation.validation import UsageError, at_least_one, check_arguments  # noqa: E402
from vlmcompress import SUPPORTED_MODEL_TYPES  # noqa: E402

log = logging.getLogger("evaluation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", choices=("auto", *SUPPORTED_MODEL_TYPES),
                   help="model family (prompts): auto, the checkpoint's model_type, or that model_type itself")
    p.add_argument("--model_args", default="", help="pretrained=PATH,kv=snapkv,kv_budget=0.1,prune=...,key=value,...")
    p.add_argument("--tasks", default=None, help="comma-separated task names, or 'list'")
    p.add_argument("--limit", type=at_least_one, default=None, help="first N samples of each task (N >= 1)")
    p.add_argument("--batch_size", type=at_least_one, default=1, help="samples per generate call (>= 1)")
    p.add_argument("--output_path", default="results",
                   help="folder for results.json, results.md, samples, pareto.png (default: ./results)")
    p.add_argument("--log_samples", action="store_true", help="write per-sample JSONL")
    p.add_argument("--use_cache", default=None, metavar="DIR", help="SQLite response cache folder (resume, reuse)")
    p.add_argument("--gen_kwargs", default="", help="e.g. max_new_tokens=32,temperature=0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--data_dir", default=None, help="local dataset copies: DIR/<task> (save_to_disk or parquet)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="run the baseline, then every combination of these values (over --model_args)")
    p.add_argument("--num_frames", type=at_least_one, default=16, help="frames sampled per video")
    p.add_argument("--predict_only", action="store_true", help="generate and log, compute no metrics")
    p.add_argument("--verbosity", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def list_tasks() -> str:
    lines = [f"{'task':<15} {'dataset':<22} {'config':<30} {'split':<11} metric"]
    for t in TASKS.values():
        lines.append(f"{t.name:<15} {t.dataset:<22} {t.config or '-':<30} {t.split:<11} {t.primary}")
    return "\n".join(lines)


def quiet_libraries(level: int) -> None:
    """transformers' and datasets' own progress bars (one per model load) off below DEBUG, since the run shows one
    overall bar; their log messages follow --verbosity, except that INFO shows only their warnings."""
    import datasets
    import transformers

    if level > logging.DEBUG:
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    library_level = logging.WARNING if level == logging.INFO else level
    transformers.utils.logging.set_verbosity(library_level)
    datasets.utils.logging.set_verbosity(library_level)


def distributed() -> tuple[int, int, str | None]:
    """(rank, world size, device) under `accelerate launch`; (0, 1, None) otherwise."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(k.startswith("ACCELERATE_") for k in os.environ)
    if not launched:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes <= 1:
        return 0, 1, None
    return state.process_index, state.num_processes, str(state.device)


def main(argv: list[str] | None = None, runner_factory=None) -> list[dict] | None:
    """Parse, check every argument (before any model is loaded), evaluate, write and print the results."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, args.verbosity)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tasks == "list":
        print(list_tasks())
        return None
    quiet_libraries(level)

    configs = None
    if not argv:  # the embedded default
        from evaluation.default import prepare

        log.info("no arguments: running the embedded offline default (see evaluation/default.py)")
        d = prepare()
        args.model_args = f"pretrained={d['pretrained']}"
        args.tasks, args.data_dir, args.limit = ",".join(d["tasks"]), d["data_dir"], d["limit"]
        args.gen_kwargs = ",".join(f"{k}={v}" for k, v in d["gen_kwargs"].items())
        args.batch_size, args.seed = d["batch_size"], d["seed"]
        args.use_cache, args.output_path = d["cache_dir"], d["output_path"]
        configs = [{}] + d["configs"]

    if not args.tasks:
        parser.error("--tasks is required (or 'list'); run with no arguments for the offline default")
    try:
        checked = check_arguments(args, configs)
    except UsageError as exc:
        parser.error(str(exc))
    rank, world, device = distributed()
    import torch

    device = args.device or device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        tasks=checked.tasks, model_args=checked.model_args, family=args.model, limit=args.limit,
        batch_size=args.batch_size, gen_kwargs=checked.gen_kwargs, seed=args.seed, device=device,
        data_dir=args.data_dir, cache_dir=args.use_cache, num_frames=args.num_frames, predict_only=args.predict_only,
        progress=rank == 0 and level <= logging.INFO, rank=rank, world=world,
    )
    log.info("configs: %s", ", ".join(run_name(c) for c in checked.configs))
    main_process = rank == 0

    def checkpoint(runs):
        if main_process:
            report.write_outputs(args.output_path, runs, settings, vars(args), log_samples=False, final=False)

    kwargs = {"runner_factory": runner_factory} if runner_factory else {}
    try:
        runs = evaluate(settings, checked.configs, on_run_done=checkpoint, **kwargs)
        if main_process:
            paths = report.write_outputs(args.output_path, runs, settings, vars(args),
                                         log_samples=args.log_samples or args.predict_only)
    except report.OutputError as exc:
        resume = (f"every finished answer is kept in the response cache {args.use_cache}: rerun the same command to "
                  "resume" if args.use_cache else "--use_cache DIR keeps finished answers for a rerun")
        sys.exit(f"error: {exc}; {resume}")
    if main_process:
        print(report.markdown_table(runs))
        files = [Path(p).name for v in paths.values() for p in (v if isinstance(v, list) else [v])]
        print(f"results: {Path(args.output_path).resolve()} ({', '.join(files)})")
        print(tally(runs, [t.name for t in settings.tasks], args.predict_only, args.output_path))
    return runs


def pair_complete(result: dict | None) -> bool:
    """A (task, config) result with at least one scored sample (a prediction, under --predict_only) and no failure."""
    return result is not None and "error" not in result and result["failures"] == 0 and result["n_scored"] > 0


def evaluated_fully(runs: list[dict]) -> bool:
    return all(run["error"] is None and all(map(pair_complete, run["tasks"].values())) for run in runs)


def tally(runs: list[dict], task_names: list[str], predict_only: bool, output_path: str | None) -> str:
    """The last line: how many samples of how many requested (task, config) pairs were evaluated, or failed."""
    noun = "predictions" if predict_only else "samples"
    results = [run["tasks"].get(name) for run in runs for name in task_names]
    counted = [r for r in results if r is not None and "error" not in r]
    samples = sum(r["n_samples"] for r in counted)
    failed = sum(r["failures"] for r in counted)
    if all(map(pair_complete, results)):
        return f"{samples} {noun} of {len(results)} (task, config) pairs, none failed"
    parts = []
    if failed:
        pairs = sum(r["failures"] > 0 for r in counted)
        parts.append(f"{failed} of {samples} {noun} failed in {pairs} (task, config) pair{'s' * (pairs != 1)}")
    empty = sum(r is None or "error" in r or r["n_scored"] == 0 for r in results)
    if empty:
        parts.append(f"{empty} of {len(results)} (task, config) pairs produced no "
                     f"{'prediction' if predict_only else 'scored sample'}")
    where = f"{Path(output_path) / 'results.json'} and the log above" if output_path else "the log above"
    return "; ".join(parts) + f"; see {where}"


def cli(argv: list[str] | None = None, runner_factory=None) -> int:
    """The command line's exit status: 1 when some requested (task, config) pair was not fully evaluated."""
    runs = main(argv, runner_factory)
    return 0 if runs is None or evaluated_fully(runs) else 1


if __name__ == "__main__":
    sys.exit(cli())
