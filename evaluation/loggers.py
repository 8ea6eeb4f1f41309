"""--wandb_args and --hf_hub_log_args: a finished run's results sent to Weights & Biases and to the Hugging Face
Hub, as lmms-eval 0.7.3's WandbLogger and EvaluationTracker do. Both libraries are imported only when the flag is
given; both flags are checked before any model loads."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .flags import UsageError
from .runner import parse_kv_list

# --------------------------------------------------------------------------- Weights & Biases


def wandb_init_args(text: str, model: str, model_args: str) -> dict:
    """wandb.init's arguments from --wandb_args; lmms-eval names the run after the model when no name is given."""
    try:
        kwargs = parse_kv_list(text)
    except ValueError as exc:
        raise UsageError(f"--wandb_args: {exc}") from None
    if importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb_args needs wandb, which is not installed: pip install wandb (or leave --wandb_args "
                         "out)")
    if "name" not in kwargs:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        kwargs["name"] = re.sub(r"[^\w.=-]+", "_", f"{model}_{model_args}_{stamp}")[:128]
    return {k: str(v) if v is not None and not isinstance(v, bool) else v for k, v in kwargs.items()}


def flat_results(document: dict) -> dict:
    """results.json's numbers as W&B keys: `config/task/metric` for each task metric, `config/summary/key`."""
    out = {}
    for run in document["runs"]:
        for task, result in run["tasks"].items():
            for metric, value in (result.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    out[f"{run['name']}/{task}/{metric}"] = value
        for key, value in (run.get("summary") or {}).items():
            if isinstance(value, (int, float)):
                out[f"{run['name']}/summary/{key}"] = value
    return out


def log_to_wandb(init_args: dict, document: dict) -> None:
    """The run's configuration and numbers to W&B (WANDB_MODE=offline keeps them in ./wandb for `wandb sync`)."""
    import wandb

    run = wandb.run or wandb.init(**init_args)
    run.config.update(document["config"], allow_val_change=True)
    results = flat_results(document)
    run.summary.update(results)
    run.log(results)
    run.finish()


# --------------------------------------------------------------------------- the Hugging Face Hub

HUB_STRINGS = ("hub_results_org", "hub_repo_name", "details_repo_name", "results_repo_name", "token",
               "leaderboard_url", "point_of_contact", "output_path")
HUB_FLAGS = ("push_results_to_hub", "push_samples_to_hub", "public_repo", "gated")


@dataclass
class HubTarget:
    """Where --hf_hub_log_args pushes: results.json to `results_repo`, per-sample logs to `details_repo`."""

    results_repo: str
    details_repo: str
    push_results: bool
    push_samples: bool
    public: bool
    gated: bool
    token: str | None


def hub_target(text: str, log_samples: bool, offline_reason) -> HubTarget | None:
    """--hf_hub_log_args checked as lmms-eval's EvaluationTracker reads it; None when nothing is to be pushed.
    `offline_reason()` says why the Hub cannot be reached, or None."""
    try:
        args = parse_kv_list(text)
    except ValueError as exc:
        raise UsageError(f"--hf_hub_log_args: {exc}") from None
    unknown = sorted(set(args) - set(HUB_STRINGS) - set(HUB_FLAGS))
    if unknown:
        raise UsageError(f"--hf_hub_log_args: unknown key {unknown[0]}; valid keys: {', '.join(HUB_STRINGS + HUB_FLAGS)}")
    for key in HUB_FLAGS:
        if not isinstance(args.get(key, False), bool):
            raise UsageError(f"--hf_hub_log_args: {key} takes True or False, got {args[key]!r}")
    if not (args.get("push_results_to_hub") or args.get("push_samples_to_hub")):
        return None
    if args.get("push_samples_to_hub") and not log_samples:
        raise UsageError("--hf_hub_log_args push_samples_to_hub=True pushes the per-sample logs: add --log_samples")
    token = args.get("token") or os.environ.get("HF_TOKEN")
    if not token:
        raise UsageError("--hf_hub_log_args: pushing needs a Hugging Face token with write access: set HF_TOKEN or "
                         "give token=...")
    org = args.get("hub_results_org")
    if not org:  # lmms-eval asks the Hub whose token it is; naming it keeps this check offline
        raise UsageError("--hf_hub_log_args: give hub_results_org=ORG, the user or organisation that gets the results")
    reason = offline_reason()
    if reason:
        raise UsageError(f"--hf_hub_log_args: pushing needs the Hugging Face Hub, which is out of reach ({reason}): "
                         "run without push_*_to_hub and upload the --output_path folder later")
    details = args.get("hub_repo_name") or args.get("details_repo_name") or "lmms-eval-results"
    results = args.get("hub_repo_name") or args.get("results_repo_name") or details
    suffix = "" if args.get("public_repo") else "-private"  # lmms-eval's private repositories
    return HubTarget(f"{org}/{results}{suffix}", f"{org}/{details}{suffix}", bool(args.get("push_results_to_hub")),
                     bool(args.get("push_samples_to_hub")), bool(args.get("public_repo")), bool(args.get("gated")),
                     str(token))


def model_name(pretrained: str) -> str:
    """The folder results go under in a repository: the Hub id, `/` as `__` (lmms-eval's sanitized model name)."""
    name = Path(pretrained).name if Path(pretrained).is_dir() else pretrained
    return name.replace("/", "__")


def stage_hub_files(target: HubTarget, written: dict, pretrained: str, staging: Path) -> dict[str, Path]:
    """The files each repository gets, laid out under `staging/<org>__<repo>/` as they will be in the repository
    (`<model>/results_<date>.json`, `<model>/samples_..._<date>.jsonl`); returns {repo id: its folder}."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    model = model_name(pretrained)
    chosen = []
    if target.push_results:
        chosen.append((target.results_repo, Path(written["results"]), f"results_{stamp}.json"))
    if target.push_samples:
        for path in map(Path, written.get("samples", [])):
            chosen.append((target.details_repo, path, f"{path.stem}_{stamp}{path.suffix}"))
    folders = {}
    for repo, source, name in chosen:
        folder = folders.setdefault(repo, staging / repo.replace("/", "__"))
        (folder / model).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / model / name)
    return folders


def push_to_hub(target: HubTarget, folders: dict[str, Path]) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=target.token)
    for repo, folder in folders.items():
        api.create_repo(repo_id=repo, repo_type="dataset", private=not target.public, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="dataset",
                          commit_message="Adding evaluation/run.py results")
        if target.gated:
            api.update_repo_settings(repo_id=repo, repo_type="dataset", gated="auto")
