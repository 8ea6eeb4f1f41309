"""lmms-eval 0.7.3's flags whose values need more than a plain type, read as lmms-eval reads them, and the checks
of the flags that mean nothing for our tasks (each refused with the reason, before any model loads)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DEFAULT_SEED = "0,1234,1234,1234"  # lmms-eval's: python random, numpy, torch, few-shot sampling
DEFAULT_MAX_BATCH_SIZE = 64        # the largest size --batch_size auto tries when --max_batch_size is not given


class UsageError(ValueError):
    """A bad command-line argument; the message is one line that names the fix."""


def at_least_one(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def limit_value(text: str) -> int | float | None:
    """--limit as lmms-eval: -1 for every sample (None), a fraction in (0, 1) of each task, or a count >= 1."""
    fix = "-1 (every sample), a fraction in (0, 1) or an integer >= 1"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {fix}, got {text!r}") from None
    if value == -1:
        return None
    if 0 < value < 1:
        return value
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be {fix}, got {text}")
    return int(value)


def samples_for(limit: int | float | None, available: int) -> int:
    """How many of a task's `available` samples --limit keeps (lmms-eval's get_sample_size: a fraction rounds up)."""
    if limit is None:
        return available
    if isinstance(limit, float):
        return int(math.ceil(available * limit))
    return min(limit, available)


def batch_size_value(text: str) -> int | str:
    """--batch_size N, `auto` (the largest size that fits, found once) or `auto:N` (found again N times per task)."""
    lowered = text.strip().lower()
    if lowered == "auto":
        return "auto"
    if lowered.startswith("auto:"):
        times = lowered.split(":", 1)[1]
        if not times.isdigit() or int(times) < 1:
            raise argparse.ArgumentTypeError(f"auto:N needs N >= 1 (how many times the size is searched), got {text!r}")
        return f"auto:{int(times)}"
    try:
        return at_least_one(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, auto or auto:N, got {text!r}") from None


def seed_value(text: str) -> tuple[int | None, int | None, int | None, int | None]:
    """--seed as lmms-eval: one value for all four seeds, or python,numpy,torch[,fewshot] (`None` leaves one unset;
    three values take the default few-shot seed)."""
    items = []
    for item in text.split(","):
        item = item.strip()
        if item.lower() == "none":
            items.append(None)
            continue
        try:
            items.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer or None") from None
    if len(items) == 1:
        return (items[0],) * 4
    if len(items) not in (3, 4):
        raise argparse.ArgumentTypeError(f"give one value or 3-4 values (python,numpy,torch[,fewshot]), got {text!r}")
    defaults = [None if v == "None" else int(v) for v in DEFAULT_SEED.split(",")]
    return tuple(items + defaults[len(items):])


def check_unsupported(args: argparse.Namespace) -> None:
    """The flags our tasks give no meaning to, refused with the reason (lmms-eval's own checks first)."""
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise UsageError("--fewshot_as_multiturn needs --apply_chat_template (as in lmms-eval)")
    if args.fewshot_as_multiturn and not args.num_fewshot:
        raise UsageError("--fewshot_as_multiturn needs --num_fewshot > 0 (as in lmms-eval), and our tasks are "
                         "zero-shot: leave --fewshot_as_multiturn out")
    if args.num_fewshot:
        raise UsageError(f"--num_fewshot {args.num_fewshot}: our tasks are zero-shot (their lmms-eval YAMLs name no "
                         "few-shot split or examples): leave --num_fewshot out or give 0")
    if args.cache_requests:
        raise UsageError(f"--cache_requests {args.cache_requests}: requests are built per sample as it is generated "
                         "(images decoded lazily), so there is nothing to cache; --use_cache DIR caches the answers")
    if args.max_batch_size is not None and not str(args.batch_size).startswith("auto"):
        raise UsageError(f"--max_batch_size {args.max_batch_size} bounds --batch_size auto only: add --batch_size "
                         "auto or leave --max_batch_size out")


INTEGRITY_TESTS = ("tests/test_eval_tasks.py", "tests/test_lmms_parity.py", "tests/test_lmms_parity_scores.py")


def run_integrity_tests(task_names: list[str]) -> None:
    """--check_integrity, as lmms-eval's run_task_tests: the repository's tests of these tasks (data loading, prompts
    and scores against lmms-eval 0.7.3), selected by task name; SystemExit(1) when they fail."""
    import pytest

    root = Path(__file__).resolve().parent.parent
    files = [str(root / f) for f in INTEGRITY_TESTS if (root / f).is_file()]
    if not files:
        sys.exit(f"error: --check_integrity runs {', '.join(INTEGRITY_TESTS)}, which are not under {root}: run from a "
                 "checkout of the repository, or leave --check_integrity out")
    code = pytest.main([*files, f"--rootdir={root}", "-q", "-p", "no:cacheprovider", "-k", " or ".join(task_names)])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        return  # tasks with no tests of their own (an --include_path YAML): nothing to check
    if code != pytest.ExitCode.OK:
        sys.exit(f"error: --check_integrity: the tests of {', '.join(task_names)} failed (pytest exit code "
                 f"{int(code)}, output above): fix them before trusting this evaluation")
