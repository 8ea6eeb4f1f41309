"""Outputs: results.json, per-sample JSONL, the Markdown table, the Pareto front and its plot.

Every file is written atomically (a temporary file in the same folder, then os.replace), so a killed
run never leaves a half-written result, and gets the mode a plain `open` would give (0666 less the umask).
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


class OutputError(OSError):
    """The output folder cannot be written (a file in its place, no space, read-only...)."""


# --------------------------------------------------------------------------- atomic files


def umask() -> int:
    """The process umask, read from /proc where Linux shows it: setting it to read it races other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name lets a later run remove what a killed one left (remove_stale_temporaries)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (`.NAME.PID.RANDOM.tmp`) of writers that are gone: a process killed between
    writing a temporary file and renaming it leaves one."""
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name.split(".")[-3]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- provenance


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("vlmcompress", "datasets", "accelerate"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                           cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def machine() -> dict:
    import torch

    out = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


# --------------------------------------------------------------------------- results


def results_document(runs: list[dict], settings, cli_args: dict | None = None) -> dict:
    """The results.json content (no per-sample records)."""
    clean = []
    for run in runs:
        r = {k: v for k, v in run.items() if k != "records"}
        r["tasks"] = {name: {k: v for k, v in t.items()} for name, t in run["tasks"].items()}
        clean.append(r)
    return _jsonable({
        "created": datetime.now(timezone.utc).isoformat(),
        "config": {
            "model": settings.family, "model_args": settings.model_args,
            "tasks": [t.name for t in settings.tasks], "limit": settings.limit, "batch_size": settings.batch_size,
            "gen_kwargs": settings.gen_kwargs, "seed": settings.seed, "device": settings.device,
            "data_dir": settings.data_dir, "cache_dir": settings.cache_dir, "num_frames": settings.num_frames,
            "predict_only": settings.predict_only, "world_size": settings.world, "cli": cli_args or {},
        },
        "versions": versions(),
        "machine": machine(),
        "failures": sum(t.get("failures", 0) for r in runs for t in r["tasks"].values()),
        "runs": clean,
        "pareto": {"kv_bytes": pareto_names(runs, "kv_bytes"), "latency_s": pareto_names(runs, "latency_s")},
    })


def write_samples(output: Path, runs: list[dict]) -> list[Path]:
    paths = []
    for run in runs:
        for task, records in run.get("records", {}).items():
            lines = []
            for r in records:
                row = {k: v for k, v in r.items()}
                lines.append(json.dumps(_jsonable(row), ensure_ascii=False))
            safe = run["name"].replace("/", "_").replace("=", "-").replace(",", "_")
            paths.append(atomic_write(output / f"samples_{safe}_{task}.jsonl", "\n".join(lines) + ("\n" if lines else "")))
    return paths


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(value):
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024


def markdown_table(runs: list[dict]) -> str:
    """One row per config x task, then one summary row per config."""
    lines = ["| config | task | metric | value | accuracy | loyalty | agreement | KV bytes | KV ratio | latency s | "
             "TTFT s | decode s/tok | visual tok | failures |",
             "|" + "---|" * 14]
    for run in runs:
        if run.get("error"):
            lines.append(f"| {run['name']} | - | error | {run['error'].replace('|', '/')} |" + " |" * 10)
            continue
        for task, t in run["tasks"].items():
            if "error" in t:
                lines.append(f"| {run['name']} | {task} | error | {t['error'].replace('|', '/')} |" + " |" * 10)
                continue
            e = t.get("efficiency", {})
            primary = t.get("primary") or {}
            lines.append(
                f"| {run['name']} | {task} | {primary.get('name', '-')} | {_fmt(primary.get('value'))} | "
                f"{_fmt(t.get('accuracy'))} | {_fmt(t.get('loyalty'))} | {_fmt(t.get('agreement'))} | "
                f"{_bytes(e.get('kv_bytes'))} | {_fmt(e.get('kv_bytes_ratio'))} | {_fmt(e.get('latency_s'), 4)} | "
                f"{_fmt(e.get('ttft_s'), 4)} | {_fmt(e.get('decode_s_per_token'), 4)} | {_fmt(e.get('visual_tokens'), 1)} | "
                f"{t.get('failures', 0)} |")
    lines += ["", "| config | mean accuracy | mean loyalty | mean agreement | KV bytes | latency s | peak memory | "
              "failures | on Pareto front (KV / latency) |", "|" + "---|" * 9]
    front_kv, front_lat = set(pareto_names(runs, "kv_bytes")), set(pareto_names(runs, "latency_s"))
    for run in runs:
        s = run.get("summary") or {}
        lines.append(
            f"| {run['name']} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('loyalty'))} | {_fmt(s.get('agreement'))} | "
            f"{_bytes(s.get('kv_bytes'))} | {_fmt(s.get('latency_s'), 4)} | {_bytes(s.get('peak_memory_bytes'))} | "
            f"{s.get('failures', 0) if not run.get('error') else 'config failed'} | "
            f"{'yes' if run['name'] in front_kv else 'no'} / {'yes' if run['name'] in front_lat else 'no'} |")
    lines += effivlm_table(runs)
    for task in dict.fromkeys(t for run in runs for t in run.get("tasks", {})):
        lines += breakdown_table(runs, task)
    return "\n".join(lines) + "\n"


def effivlm_table(runs: list[dict]) -> list[str]:
    """Lines of the EffiVLM-Bench summary table (evaluation/summary.py): OP, OL, OE and each task's score
    relative to the baseline, one row per compressed config; none without a compressed config."""
    compressed = [run for run in runs if not run.get("baseline")]
    if not compressed:
        return []
    tasks = list(dict.fromkeys(t for run in runs for t in run.get("tasks", {})))
    lines = ["", "| config | OP | OL | OE | " + " | ".join(f"{t} relative" for t in tasks) + " |",
             "|" + "---|" * (4 + len(tasks))]
    for run in compressed:
        s = run.get("summary") or {}
        relative = s.get("relative_performance") or {}
        lines.append(f"| {run['name']} | {_fmt(s.get('OP'))} | {_fmt(s.get('OL'))} | {_fmt(s.get('OE'), 2)} | "
                     + " | ".join(_fmt(relative.get(t)) for t in tasks) + " |")
    return lines


def breakdown_table(runs: list[dict], task: str) -> list[str]:
    """Lines of a per-config table of `task`'s sub-metrics (`<primary>_<part>`, e.g. exact match per
    question type), or none when the task reports no such breakdown."""
    scored = [(run["name"], run["tasks"][task]) for run in runs
              if not run.get("error") and task in run.get("tasks", {}) and "error" not in run["tasks"][task]]
    prefix = next(((t.get("primary") or {}).get("name", "") + "_" for _, t in scored), None)
    parts = list(dict.fromkeys(k for _, t in scored for k in t.get("metrics", {}) if prefix and k.startswith(prefix)))
    if not parts:
        return []
    header = f"| config | {task}: " + " | ".join(k[len(prefix):] for k in parts) + " |"
    lines = ["", header, "|" + "---|" * (len(parts) + 1)]
    lines += [f"| {name} | " + " | ".join(_fmt(t["metrics"].get(k)) for k in parts) + " |" for name, t in scored]
    return lines


# --------------------------------------------------------------------------- Pareto


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (cost x lower-or-equal and accuracy y higher-or-equal,
    one strictly), sorted by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _points(runs, cost_key):
    named = []
    for run in runs:
        s = run.get("summary") or {}
        if run.get("error") or s.get("accuracy") is None or s.get(cost_key) is None:
            continue
        named.append((run["name"], float(s[cost_key]), float(s["accuracy"])))
    return named


def pareto_names(runs: list[dict], cost_key: str) -> list[str]:
    named = _points(runs, cost_key)
    return [named[i][0] for i in pareto_front([(x, y) for _, x, y in named])]


def pareto_plot(runs: list[dict], path: str | Path) -> Path | None:
    """Accuracy vs KV bytes and vs latency, Pareto front highlighted; None when there is nothing to plot, or
    when matplotlib (the `eval` extra) is not installed: the tables do not need it, so the run goes on."""
    try:
        import matplotlib
    except ImportError:
        log.warning("pareto.png not drawn: matplotlib is not installed (pip install 'vlmcompress[eval]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kv_bytes", "KV-cache bytes after prefill (mean per sample)"), ("latency_s", "latency per sample (s)")]
    if not any(_points(runs, key) for key, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, label) in zip(axes, panels):
        named = _points(runs, key)
        if not named:
            ax.set_title(f"no {key} data")
            continue
        xs, ys = [p[1] for p in named], [p[2] for p in named]
        front = pareto_front(list(zip(xs, ys)))
        ax.scatter(xs, ys, c="tab:gray", label="configs", zorder=2)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", c="tab:red", label="Pareto front", zorder=3)
        for name, x, y in named:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("mean accuracy over tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("accuracy vs cost")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, png.getvalue())


def write_outputs(output: str | Path, runs: list[dict], settings, cli_args=None, log_samples=False, final=True) -> dict:
    """results.json, results.md, samples_*.jsonl (log_samples) and pareto.png (more than one config).

    Raises OutputError when the folder cannot be written."""
    output = Path(output)
    doc = results_document(runs, settings, cli_args)
    try:
        if output.is_dir():
            remove_stale_temporaries(output)
        paths = {"results": atomic_write(output / "results.json", json.dumps(doc, indent=2)),
                 "table": atomic_write(output / "results.md", markdown_table(runs))}
        if log_samples:
            paths["samples"] = write_samples(output, runs)
        if final and len(runs) > 1:
            plot = pareto_plot(runs, output / "pareto.png")
            if plot:
                paths["pareto"] = plot
    except OSError as exc:
        why = "a file is in its place" if output.is_file() else f"{exc.strerror or exc} ({exc.filename or output})"
        raise OutputError(f"cannot write the results to {output}: {why}") from exc
    return paths
