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
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import flags, loggers, report  # noqa: E402
from evaluation.flags import UsageError, at_least_one  # noqa: E402
from evaluation.runner import Settings, evaluate, run_name  # noqa: E402
from evaluation.validation import HubAccess, available_tasks, check_arguments  # noqa: E402
from vlmcompress import SUPPORTED_MODEL_TYPES  # noqa: E402

log = logging.getLogger("evaluation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", choices=("auto", *SUPPORTED_MODEL_TYPES),
                   help="model family (prompts): auto, the checkpoint's model_type, or that model_type itself")
    p.add_argument("--model_args", default="", help="pretrained=PATH,kv=snapkv,kv_budget=0.1,prune=...,key=value,...")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names; 'list' names them, 'list_with_num' counts their local samples")
    p.add_argument("--include_path", default=None, metavar="DIR", help="folder of lmms-eval task YAMLs to add")
    p.add_argument("--limit", type=flags.limit_value, default=None,
                   help="per task: the first N samples (N >= 1), a fraction in (0, 1) of them, or -1 for all")
    p.add_argument("--batch_size", "-b", type=flags.batch_size_value, default=1, metavar="auto|auto:N|N",
                   help="samples per generate call; auto: the largest that fits in memory, auto:N: searched N times")
    p.add_argument("--max_batch_size", type=at_least_one, default=None, metavar="N",
                   help=f"the largest size --batch_size auto tries (default {flags.DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--output_path", default="results",
                   help="folder for results.json, results.md, samples, pareto.png (default: ./results)")
    p.add_argument("--log_samples", action="store_true", help="write per-sample JSONL")
    p.add_argument("--use_cache", default=None, metavar="DIR", help="SQLite response cache folder (resume, reuse)")
    p.add_argument("--gen_kwargs", default="", help="e.g. max_new_tokens=32,temperature=0")
    p.add_argument("--system_instruction", default=None, help="text put before each prompt (lmms-eval's)")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="give --system_instruction as the chat template's system turn (prompts always use the template)")
    p.add_argument("--seed", type=flags.seed_value, default=flags.DEFAULT_SEED,
                   help="python,numpy,torch[,fewshot] seeds, None leaving one unset, or one value for all "
                        f"(default {flags.DEFAULT_SEED})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--data_dir", default=None, help="local dataset copies: DIR/<task> (save_to_disk or parquet)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="run the baseline, then every combination of these values (over --model_args)")
    p.add_argument("--num_frames", type=at_least_one, default=16, help="frames sampled per video")
    p.add_argument("--predict_only", action="store_true", help="generate and log, compute no metrics")
    p.add_argument("--write_out", "-w", action="store_true", help="print each task's first prompt and target")
    p.add_argument("--show_config", action="store_true", help="print the results with every task's definition")
    p.add_argument("--check_integrity", action="store_true",
                   help="run the tests of the chosen tasks (tests/test_eval_tasks.py, the lmms-eval parity tests) first")
    p.add_argument("--wandb_args", default="", help="wandb.init arguments, e.g. project=vlmcompress,job_type=eval")
    p.add_argument("--hf_hub_log_args", default="",
                   help="e.g. hub_results_org=ORG,push_results_to_hub=True,push_samples_to_hub=True,public_repo=False")
    p.add_argument("--num_fewshot", type=int, default=None, help="0 only: our tasks are zero-shot")
    p.add_argument("--fewshot_as_multiturn", action="store_true", help="refused: our tasks are zero-shot")
    p.add_argument("--cache_requests", default=None, choices=("true", "refresh", "delete"),
                   help="refused: requests are built per sample; --use_cache caches answers")
    p.add_argument("--verbosity", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def list_tasks(available: dict) -> str:
    lines = [f"{'task':<15} {'dataset':<22} {'config':<30} {'split':<11} metric"]
    for t in available.values():
        lines.append(f"{t.name:<15} {t.dataset:<22} {t.config or '-':<30} {t.split:<11} {t.primary}")
    return "\n".join(lines)


def count_tasks(available: dict, data_dir: str | None) -> tuple[str, list[str]]:
    """--tasks list_with_num: each task's sample count, from a local copy, its builder or the Hub cache only (never
    a download); returns the table and the tasks that have no such copy."""
    from unittest import mock

    import datasets
    import huggingface_hub

    from evaluation.data import load_rows, local_path
    from evaluation.validation import dataset_cached, one_line

    lines, missing = [f"{'task':<15} {'samples':>8}  source"], []
    for t in available.values():
        if data_dir and local_path(data_dir, t.name, t.dataset):
            source = f"--data_dir {data_dir}"
        elif t.builder or Path(t.dataset).is_dir():
            source = "drawn by its builder" if t.builder else t.dataset
        elif any(dataset_cached(d) for d in (t.dataset, *t.mirrors)):
            source = "Hub cache"
        else:
            missing.append(t.name)
            lines.append(f"{t.name:<15} {'-':>8}  no local or cached copy")
            continue
        try:
            with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
                    mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):  # the cache, never the Hub
                n = len(load_rows(t, data_dir))
        except Exception as exc:  # noqa: BLE001 - an incomplete cache or a bad copy: that task is not counted
            missing.append(t.name)
            lines.append(f"{t.name:<15} {'-':>8}  {source} cannot be read: {type(exc).__name__}: {one_line(exc)[:200]}")
            continue
        lines.append(f"{t.name:<15} {n:>8}  {source}")
    return "\n".join(lines), missing


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


def main(argv: list[str] | None = None, runner_factory=None, configs: list[dict] | None = None) -> list[dict] | None:
    """Parse, check every argument (before any model is loaded), evaluate, write and print the results.

    `configs` (compression dicts, `{}` the baseline) replaces what --model_args/--sweep describe, for a
    grid no sweep spans (evaluation/reference_benchmark.py)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, args.verbosity)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tasks in ("list", "list_with_num"):
        try:
            available = available_tasks(args.include_path)
        except UsageError as exc:
            parser.error(str(exc))
        if args.tasks == "list":
            print(list_tasks(available))
            return None
        table, missing = count_tasks(available, args.data_dir)
        print(table)
        if missing:
            sys.exit(f"error: --tasks list_with_num counts local or cached data only, and {', '.join(missing)} "
                     f"{'has' if len(missing) == 1 else 'have'} no readable copy: pass --data_dir DIR with DIR/<task> "
                     "copies, or download them while online")
        return None
    quiet_libraries(level)

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
        wandb_args = loggers.wandb_init_args(args.wandb_args, args.model, args.model_args) if args.wandb_args else None
        hub = loggers.hub_target(args.hf_hub_log_args, args.log_samples or args.predict_only,
                                 HubAccess().offline_reason) if args.hf_hub_log_args else None
    except UsageError as exc:
        parser.error(str(exc))
    if args.write_out:
        log.warning("--write_out prints each task's first prompt; lmms-eval deprecates it for --log_samples")
    if args.check_integrity:
        flags.run_integrity_tests([t.name for t in checked.tasks])
    rank, world, device = distributed()
    import torch

    device = args.device or device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        tasks=checked.tasks, model_args=checked.model_args, family=args.model, limit=args.limit,
        batch_size=args.batch_size, gen_kwargs=checked.gen_kwargs, seed=args.seed, device=device,
        data_dir=args.data_dir, cache_dir=args.use_cache, num_frames=args.num_frames, predict_only=args.predict_only,
        progress=rank == 0 and level <= logging.INFO, rank=rank, world=world, max_batch_size=args.max_batch_size,
        system_instruction=args.system_instruction, apply_chat_template=args.apply_chat_template,
        write_out=args.write_out,
    )
    cli_args = dict(vars(args), hf_hub_log_args=re.sub(r"token=[^,]*", "token=<hidden>", args.hf_hub_log_args))
    log.info("configs: %s", ", ".join(run_name(c) for c in checked.configs))
    main_process = rank == 0

    def checkpoint(runs):
        if main_process:
            report.write_outputs(args.output_path, runs, settings, cli_args, log_samples=False, final=False)

    kwargs = {"runner_factory": runner_factory} if runner_factory else {}
    try:
        runs = evaluate(settings, checked.configs, on_run_done=checkpoint, **kwargs)
        if main_process:
            paths = report.write_outputs(args.output_path, runs, settings, cli_args,
                                         log_samples=args.log_samples or args.predict_only)
            publish(runs, settings, cli_args, paths, wandb_args, hub, args.show_config)
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


def publish(runs, settings, cli_args, paths, wandb_args, hub, show_config) -> None:
    """--show_config, --wandb_args and --hf_hub_log_args, once the results are written."""
    if not (show_config or wandb_args or hub):
        return
    document = report.results_document(runs, settings, cli_args)
    if show_config:  # as lmms-eval: the results, with every task's definition under "configs"
        document["configs"] = {t.name: dataclasses.asdict(t) for t in settings.tasks}
        print(json.dumps(document, indent=2, default=str))
    if wandb_args:
        loggers.log_to_wandb(wandb_args, document)
    if hub:
        folders = loggers.stage_hub_files(hub, paths, str(settings.model_args["pretrained"]),
                                          Path(cli_args["output_path"]) / "hub_upload")
        loggers.push_to_hub(hub, folders)


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
