"""EffiVLM-Bench's summary metrics (Wang et al., ACL 2025, arXiv:2506.00479): OP, OL, OE, OG.

Per compressed config, against the uncompressed baseline of the same model on the same tasks:

- OP (overall performance): the mean over tasks of the task's headline score relative to the baseline's,
  r_t = score_t / baseline_score_t (a task whose baseline scores 0 has no r_t and is left out);
- OL (overall loyalty): the mean over tasks of the task's loyalty (its metric scored against the baseline's
  answers, `runner.score_task`);
- OE (overall efficiency): the mean over tasks of the measured speed-up, baseline latency / compressed latency.

Over several models (`evaluation/compare.py`): OG (overall generalization), the population standard deviation
of every r_{m,t} of one config across models m and tasks t; 0 when compression costs the same share of
the score everywhere, lower is better. docs/evaluation.md says why these formulas.
"""

from __future__ import annotations

from statistics import mean, pstdev


def mean_of_defined(values) -> float | None:
    """The mean of the values that are not None; None when all are."""
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def headline(task_result: dict) -> float | None:
    """A task's headline score (its `primary` metric), None when the task was not scored."""
    return (task_result.get("primary") or {}).get("value")


def relative_performance(task_result: dict, baseline_result: dict | None) -> float | None:
    """score / baseline score of one task; None without both scores or when the baseline scored 0."""
    if baseline_result is None:
        return None
    score, base = headline(task_result), headline(baseline_result)
    if score is None or not base:
        return None
    return score / base


def config_metrics(task_results: dict, baseline_tasks: dict | None) -> dict:
    """OP, OL, OE and the per-task relative performance of one config; all None for the baseline itself
    (`baseline_tasks` None)."""
    if baseline_tasks is None:
        return {"OP": None, "OL": None, "OE": None, "relative_performance": {}}
    relative = {name: relative_performance(t, baseline_tasks.get(name)) for name, t in task_results.items()}
    return {
        "OP": mean_of_defined(relative.values()),
        "OL": mean_of_defined(t.get("loyalty") for t in task_results.values()),
        "OE": mean_of_defined((t.get("efficiency") or {}).get("speedup") for t in task_results.values()),
        "relative_performance": relative,
    }


def generalization(relative_by_model: dict[str, dict[str, float | None]]) -> float | None:
    """OG: the population standard deviation of the defined relative performances of one config over
    every model and task ({model: {task: r}}); None when there is none."""
    values = [r for per_task in relative_by_model.values() for r in per_task.values() if r is not None]
    return pstdev(values) if values else None
