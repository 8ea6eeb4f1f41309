"""The CLI's arguments checked before any model is loaded or sample generated.

Each check reads only what is cheap (argument text, the checkpoint's `config.json`, folder listings,
a SQLite header) and raises a `UsageError` whose one-line message names the fix. What can only fail
later (a sample's image, a prompt too short for a budget) is counted by the runner instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vlmcompress import SUPPORTED_MODEL_TYPES

from .data import local_path
from .flags import UsageError, check_unsupported
from .runner import BASE_KEYS, build_configs, generation_kwargs, parse_kv_list, parse_sweep, run_name, split_model_args
from .tasks import TASKS, Task

log = logging.getLogger("evaluation")

SQLITE_HEADER = b"SQLite format 3\x00"
CACHE_FILE = "responses.sqlite"  # the file ResponseCache keeps in its folder


@dataclass
class Checked:
    """The arguments, parsed and checked."""

    model_args: dict
    configs: list[dict]
    tasks: list[Task]
    gen_kwargs: dict


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_arguments(args: argparse.Namespace, configs: list[dict] | None = None) -> Checked:
    """Every check, cheapest first; `configs` overrides the ones --model_args/--sweep describe."""
    try:
        model_args = parse_kv_list(args.model_args)
    except ValueError as exc:
        raise UsageError(f"--model_args: {exc}") from None
    if "pretrained" not in model_args:
        raise UsageError("--model_args needs pretrained=<hub id or checkpoint folder>")
    tasks = check_tasks(args.tasks, available_tasks(args.include_path))
    if configs is None:
        configs = check_configs(model_args, args.sweep)
    else:
        for config in configs:
            check_compression(config, model_args, f"config {run_name(config)}")
    check_dtype(model_args.get("dtype"))
    gen_kwargs = check_generation(args.gen_kwargs, tasks)
    check_device(args.device)
    check_unsupported(args)
    if args.output_path:
        check_writable_folder(args.output_path, "--output_path")
    if args.use_cache:
        check_cache_folder(args.use_cache)
    hub = HubAccess()
    check_checkpoint(str(model_args["pretrained"]), args.model, hub)
    check_quant_group_sizes(configs, str(model_args["pretrained"]), hub)
    check_data(tasks, args.data_dir, hub)
    return Checked(model_args, configs, tasks, gen_kwargs)


# --------------------------------------------------------------------------- tasks and configs


def available_tasks(include_path: str | None) -> dict[str, Task]:
    """Our tasks, and those of --include_path's lmms-eval YAMLs; on a shared name ours are kept, as lmms-eval keeps
    its own tasks over --include_path ones."""
    from .tasks.yaml_tasks import TaskYamlError, load_include_path

    if not include_path:
        return TASKS
    try:
        added = load_include_path(include_path)
    except TaskYamlError as exc:
        raise UsageError(f"--include_path {one_line(exc)}") from None
    for name in sorted(set(added) & set(TASKS)):
        log.warning("--include_path %s: task %s is already defined here, so its YAML is not used (lmms-eval also keeps "
                    "its own task): rename the YAML's task", include_path, name)
    return {**added, **TASKS}


def check_tasks(spec: str, available: dict[str, Task] = TASKS) -> list[Task]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError("--tasks names no task: give comma-separated names (--tasks list shows them)")
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(f"--tasks: unknown task {name!r}; {hint}--tasks list shows all {len(available)}")
    return [available[n] for n in names]


def check_configs(model_args: dict, sweep: list[str] | None) -> list[dict]:
    """The configs to run; each combination is checked as given, before any is dropped as a baseline."""
    combos = None
    if sweep:
        try:
            combos = parse_sweep(sweep)
        except ValueError as exc:
            raise UsageError(one_line(exc)) from None
        fixed = sorted(set(combos[0]) & set(BASE_KEYS))
        if fixed:
            raise UsageError(f"--sweep {fixed[0]}: only compression settings are swept; set {fixed[0]} in --model_args")
    _, compression = split_model_args(model_args)
    for combo in combos or [{}]:
        where = f"--sweep config {','.join(f'{k}={v}' for k, v in combo.items())}" if combo else "--model_args"
        check_compression(dict(compression, **combo), model_args, where)
    return build_configs(model_args, combos)


def check_compression(config: dict, model_args: dict, where: str) -> None:
    """`vlmcompress.load`'s own validation of one config (the throwaway cache it builds leaves no hook)."""
    from vlmcompress.config import build_settings

    try:
        build_settings(**config, cuda_graphs=model_args.get("cuda_graphs"))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {one_line(exc)}") from None


def check_dtype(dtype) -> None:
    import torch

    if dtype not in (None, "auto") and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise UsageError(f"--model_args dtype={dtype!r} is not a torch dtype: use auto, bfloat16, float16 or float32")


# --------------------------------------------------------------------------- generation and device


def check_generation(text: str, tasks: list[Task]) -> dict:
    """--gen_kwargs parsed, and the settings each task generates with accepted by transformers.

    `GenerationConfig.validate(strict=True)` rejects inconsistent flags; the value checks that
    transformers only makes inside `generate` (logits processors, unused keys) are run by one
    greedy step of a scratch one-layer language model, so a bad value fails here and not per sample.
    """
    try:
        user = parse_kv_list(text)
    except ValueError as exc:
        raise UsageError(f"--gen_kwargs: {exc}") from None
    settings = {json.dumps(generation_kwargs(t, user), sort_keys=True, default=str) for t in tasks}
    for kwargs in (json.loads(s) for s in sorted(settings)):
        kwargs.pop("until", None)  # stop strings are cut from the answer (runner.cut_at_stop_strings), not generate's
        try:
            try_generation(kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, TypeError, ZeroDivisionError...
            raise UsageError(f"--gen_kwargs {text!r}: {type(exc).__name__}: {one_line(exc)} (transformers' "
                             "GenerationConfig documents the valid keys and values)") from None
    return user


def try_generation(kwargs: dict) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, StoppingCriteria

    class FirstToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    GenerationConfig(**kwargs).validate(strict=True)
    config = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():  # leaves the run's random state alone
        scratch = LlamaForCausalLM(config).eval()
        scratch.generate(torch.tensor([[2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                         stopping_criteria=[FirstToken()], **kwargs)


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {device}: this machine cannot use it ({one_line(exc)}): use --device cpu "
                         "or leave --device out") from None


# --------------------------------------------------------------------------- files


def check_writable_folder(path: str, flag: str) -> None:
    """`path` is a folder, or can become one, that this process may write into."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder: pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable: pass a folder you can write to")


def describe_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "a SQLite database" if f.read(len(SQLITE_HEADER)) == SQLITE_HEADER else "a file"


def check_cache_folder(path: str) -> None:
    """--use_cache is a folder whose responses.sqlite, if any, is a response cache; nothing is written."""
    import sqlite3

    folder = Path(path).expanduser()
    if folder.is_file():
        hint = f" (here --use_cache {folder.parent})" if folder.name == CACHE_FILE else ""
        raise UsageError(f"--use_cache {path} is {describe_file(folder)}, not a folder: --use_cache takes the folder "
                         f"that holds {CACHE_FILE}{hint}")
    check_writable_folder(path, "--use_cache")
    database = folder / CACHE_FILE
    if not database.exists():
        return
    fix = "move it away or choose another --use_cache folder (it is left as it is)"
    if not database.is_file():
        raise UsageError(f"--use_cache {path}: {database} is not a file: {fix}")
    if database.stat().st_size == 0:  # SQLite's empty database: the cache creates its table
        return
    if describe_file(database) != "a SQLite database":
        raise UsageError(f"--use_cache {path}: {database} is not a SQLite database (corrupt or another file): {fix}")
    if database.with_name(f"{CACHE_FILE}-wal").exists():
        return  # in use (or left by a killed run): only SQLite's own locking reads it safely, the cache will
    # immutable: read without taking locks or creating the -shm/-wal side files
    try:
        connection = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "responses" in tables:
                connection.execute("SELECT key, response FROM responses LIMIT 1").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"--use_cache {path}: {database} is a damaged SQLite database ({exc}): {fix}") from None
    # no table at all: an empty database, or one another run is creating the cache in right now (its header is
    # written before its table): the cache creates the table itself
    if tables and "responses" not in tables:
        raise UsageError(f"--use_cache {path}: {database} is a SQLite database of another program (tables "
                         f"{sorted(tables)}), not a response cache: {fix}")


# --------------------------------------------------------------------------- the Hub: checkpoint and data


class HubAccess:
    """Whether the Hugging Face Hub can be asked, decided once and within seconds."""

    def __init__(self, timeout_s: float = 3.0):
        self.timeout_s = timeout_s
        self._reason: str | None | bool = False  # False: not probed yet

    def offline_reason(self) -> str | None:
        """Why the Hub cannot be reached (HF_HUB_OFFLINE, no network), or None when it can."""
        if self._reason is False:
            self._reason = self._probe()
        return self._reason

    def _probe(self) -> str | None:
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
                return f"{variable} is set"
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=self.timeout_s).close()
        except OSError as exc:
            return f"{endpoint.hostname} is unreachable: {exc}"
        return None


def read_model_config(pretrained: str, hub: HubAccess) -> dict:
    """The checkpoint's config.json (a local folder, the Hub cache, or the Hub), nothing else."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(pretrained).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UsageError(f"--model_args pretrained={pretrained} has no config.json: pass a checkpoint folder "
                             "written by save_pretrained, or a Hub id")
        return json.loads((folder / "config.json").read_text())
    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        raise UsageError(f"--model_args pretrained={pretrained}: no such folder (and not a Hub id like org/name): "
                         "check the path") from None
    cached = try_to_load_from_cache(pretrained, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    reason = hub.offline_reason()
    if reason:
        raise UsageError(f"--model_args pretrained={pretrained}: no such folder, and not in the Hub cache while the "
                         f"Hub is out of reach ({reason}): pass a local checkpoint folder or download it first")
    try:
        return json.loads(Path(hf_hub_download(pretrained, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 - not found, gated, network: all end here
        raise UsageError(f"--model_args pretrained={pretrained}: no such folder, and the Hub gives no config.json "
                         f"for it ({type(exc).__name__}): check the path or the Hub id") from None


def check_checkpoint(pretrained: str, family: str, hub: HubAccess) -> str:
    """The checkpoint's model_type: one vlmcompress supports, and the one --model names (unless auto)."""
    model_type = read_model_config(pretrained, hub).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"--model_args pretrained={pretrained} is a {model_type!r} model (config.json); vlmcompress "
                         f"evaluates {', '.join(SUPPORTED_MODEL_TYPES)}: pass one of those checkpoints")
    if family not in ("auto", model_type):
        raise UsageError(f"--model {family} does not match the checkpoint's model_type {model_type!r}: use --model "
                         f"{model_type} or --model auto")
    return model_type


def check_quant_group_sizes(configs: list[dict], pretrained: str, hub: HubAccess) -> None:
    """Each config's quant_group_size divides the language model's layer widths (config.json), before any weight."""
    from transformers import PretrainedConfig

    from vlmcompress.quantization.base import DEFAULT_GROUP_SIZE, check_group_fits_config

    quantized = [c for c in configs if c.get("quant") not in (None, "none", "None")]
    if not quantized:
        return
    config_dict = read_model_config(pretrained, hub)
    text = config_dict.get("text_config") or config_dict.get("llm_config") or config_dict
    config = PretrainedConfig(text_config=PretrainedConfig(**text))
    for c in quantized:
        try:
            check_group_fits_config(config, c.get("quant_group_size", DEFAULT_GROUP_SIZE), c.get("targets"))
        except ValueError as exc:
            raise UsageError(f"config {run_name(c)}: {one_line(exc)}") from None


def dataset_cached(dataset_id: str) -> bool:
    """Some copy of a Hub dataset in the local caches (datasets' prepared one or the Hub download)."""
    from huggingface_hub import constants

    home = Path(constants.HF_HOME)
    prepared = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")) / dataset_id.replace("/", "___")
    downloaded = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset_id.replace('/', '--')}"
    return prepared.is_dir() or downloaded.is_dir()


def check_data(tasks: list[Task], data_dir: str | None, hub: HubAccess) -> None:
    """Each task's rows can be had: a --data_dir copy, its builder, the Hub, or the Hub cache when offline."""
    if data_dir and not Path(data_dir).is_dir():
        raise UsageError(f"--data_dir {data_dir} is not a folder: pass the folder that holds <task> copies")
    for task in tasks:
        tables = [(task.name, task.dataset, task.mirrors)]
        if task.image_join:
            tables.append((f"{task.name}_images", task.image_join[0], ()))
        for name, dataset, mirrors in tables:
            if (task.builder and name == task.name) or Path(dataset).is_dir():
                continue
            if data_dir:
                if local_path(data_dir, name, dataset) is None:
                    raise UsageError(f"--data_dir {data_dir} has no copy of {name}: expected {Path(data_dir) / name} "
                                     "(a save_to_disk folder or parquet files; see docs/evaluation.md)")
                continue
            reason = hub.offline_reason()
            if reason and not any(dataset_cached(d) for d in (dataset, *mirrors)):
                raise UsageError(f"task {task.name} reads {dataset} from the Hub, which is out of reach ({reason}), "
                                 f"and not in the local cache: pass --data_dir DIR with a copy at DIR/{name}, or "
                                 "download it while online (without HF_HUB_OFFLINE)")
