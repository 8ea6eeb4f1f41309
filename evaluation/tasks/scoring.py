"""Per-sample scorers, aggregations and loyalty references, each as lmms-eval 0.7.3's process_results,
filters, metric and aggregation functions compute them.

A scorer takes (prediction, references, sample, rng) and returns {metric: value}; the prediction is
stripped first, as lmms-eval strips every generation before scoring. `rng` is the `random.Random`
that MMMU's fallback draws from (seeded per task like lmms-eval's `random.seed`).
An aggregation takes (task, [(sample, scores)]) and returns the task's metrics.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from statistics import mean

from .. import extraction as X
from .. import metrics as M

log = logging.getLogger("evaluation")

# --------------------------------------------------------------------------- scorers


def score_anls(pred, refs, sample, rng):
    return {"anls": M.anls(pred, refs)}


def score_vqa(pred, refs, sample, rng):
    return {"exact_match": M.vqa_accuracy(pred, refs)}


def score_relaxed(pred, refs, sample, rng):
    s = max(M.relaxed_accuracy(pred, r) for r in refs)
    split = "relaxed_human_split" if sample["meta"].get("type") == "human_test" else "relaxed_augmented_split"
    return {"relaxed_overall": s, split: s}


def score_ocrbench(pred, refs, sample, rng):
    return {"ocrbench_accuracy": M.ocrbench_score(pred, refs, sample["meta"].get("dataset", ""))}


def score_ai2d(pred, refs, sample, rng):
    return {"exact_match": M.exact_match(X.ai2d_filter(pred).strip(), refs)}


def score_scienceqa(pred, refs, sample, rng):
    return {"exact_match": float(X.scienceqa_choice(pred).lower() == refs[0].strip().lower())}


def _mmmu_multiple_choice(sample) -> bool:
    return sample["meta"].get("question_type") == "multiple-choice"


def score_mmmu(pred, refs, sample, rng):
    if _mmmu_multiple_choice(sample):
        letter, fell_back = X.mmmu_choice(pred, sample["options"], rng)
        return {"mmmu_acc": float(letter == refs[0]), "mmmu_random_fallback": float(fell_back)}
    return {"mmmu_acc": float(X.mmmu_open_correct(refs[0], X.mmmu_open_candidates(pred)))}


def score_yes_no(pred, refs, sample, rng):
    return {"mme_acc": float(M.parse_yes_no(pred) == refs[0].lower().strip().replace(".", ""))}


def score_exact(pred, refs, sample, rng):
    return {"exact_match": M.exact_match(pred, refs)}


def _realworldqa_is_choice(sample) -> bool:
    return sample["answers"][0].strip().upper() in ("A", "B", "C", "D")


def score_realworldqa(pred, refs, sample, rng):
    gold = refs[0].strip()
    if _realworldqa_is_choice(sample):
        return {"exact_match": float(X.mcq_letter(pred) == gold.upper())}
    return {"exact_match": float(pred.lower().strip().rstrip(".") == gold.lower())}


def score_videomme(pred, refs, sample, rng):
    letter = X.mcq_letter(pred)
    # lmms-eval's per-sample score ignores case, its aggregate (the reported number) does not
    return {"videomme_accuracy": float(letter.lower() == refs[0].lower()), "videomme_exact": float(letter == refs[0])}


def score_synthvqa(pred, refs, sample, rng):
    """SynthVQA's exact match (evaluation.reference.synthvqa.exact_match), overall and under the question type.

    The per-type keys (`exact_match_attribute`, ..., `exact_match_long_context`) are averaged over the
    samples of that type only by the mean aggregation: they are the per-type accuracies.
    """
    from ..reference.synthvqa import exact_match as synthvqa_exact_match

    score = synthvqa_exact_match(pred, refs)
    out = {"exact_match": score}
    qtype = (sample.get("meta") or {}).get("question_type")
    if qtype:
        out[f"exact_match_{qtype}"] = score
    return out


SCORERS = {
    "anls": score_anls, "vqa": score_vqa, "relaxed": score_relaxed, "ocrbench": score_ocrbench, "ai2d": score_ai2d,
    "scienceqa": score_scienceqa, "mmmu": score_mmmu, "yes_no": score_yes_no, "exact": score_exact,
    "realworldqa": score_realworldqa, "videomme": score_videomme, "synthvqa": score_synthvqa,
}


def score_sample(task, prediction: str, references: list[str], sample: dict, rng: random.Random) -> dict:
    """The task's per-sample scores of one generation (stripped first, as lmms-eval does)."""
    return SCORERS[task.scorer](str(prediction).strip(), references, sample, rng)


def loyalty_references(task, baseline_prediction: str, sample, rng: random.Random) -> list[str]:
    """The baseline's answer in the form the task's scorer compares against (a letter, yes/no, or the text)."""
    text = str(baseline_prediction).strip()
    if task.scorer == "ai2d":
        return [X.ai2d_filter(text).strip()]
    if task.scorer == "scienceqa":
        return [X.scienceqa_choice(text)]
    if task.scorer == "mmmu" and _mmmu_multiple_choice(sample):
        return [X.mmmu_choice(text, sample["options"], rng)[0]]
    if task.scorer == "videomme" or (task.scorer == "realworldqa" and _realworldqa_is_choice(sample)):
        return [X.mcq_letter(text)]
    if task.scorer == "yes_no":
        return [M.parse_yes_no(text)]
    if task.scorer == "realworldqa":
        return [text.lower().rstrip(".")]
    if task.scorer == "vqa":  # ten agreeing annotators: a matching answer scores 1 (one alone would score 0)
        return [text] * 10
    return [text]


# --------------------------------------------------------------------------- aggregations


def lmms_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)  # lmms-eval's `mean` (summed in order, not statistics.mean)


def agg_mean(task, records):
    keys = sorted({k for _, scores in records for k in scores})
    return {k: lmms_mean(s[k] for _, s in records if k in s) for k in keys}


def agg_mme(task, records):
    out = {"mme_acc": mean(s["mme_acc"] for _, s in records)}
    totals = M.mme_scores(
        {"question_id": sample["id"], "category": sample["meta"].get("category"), "score": scores["mme_acc"]}
        for sample, scores in records
    )
    out.update({k: v for k, v in totals.items() if k.startswith("mme_")})
    out["mme_categories"] = totals["categories"]
    out["mme_unpaired_questions"] = totals["unpaired_questions"]
    if totals["unpaired_questions"]:
        log.warning("%s: %d questions without their pair (--limit?) are left out of the MME scores",
                    task.name, totals["unpaired_questions"])
    return out


def agg_ocrbench(task, records):
    return M.ocrbench_totals(
        {"question_type": sample["meta"].get("question_type", ""), "score": scores["ocrbench_accuracy"]}
        for sample, scores in records
    )


def _mmmu_subject(sample_id: str) -> str:
    """The subject in an MMMU id ("validation_Art_Theory_12" -> "Art_Theory")."""
    prefix = sample_id.split("_")[0]
    match = re.search(rf"^{prefix}_(.+?)_\d+$", sample_id)
    return match.group(1) if match else ""


def agg_mmmu(task, records):
    """MMMU accuracy as lmms-eval: per subject, then weighted by subject size, rounded to 5 decimals;
    plus how many multiple-choice answers fell back to a random letter."""
    by_subject = defaultdict(list)
    for sample, scores in records:
        by_subject[_mmmu_subject(str(sample["id"]))].append(scores["mmmu_acc"])
    weighted, n = 0.0, 0
    for values in by_subject.values():
        weighted += sum(values) / len(values) * len(values)
        n += len(values)
    fallbacks = sum(int(s.get("mmmu_random_fallback", 0)) for _, s in records)
    if fallbacks:
        log.warning("%s: %d of %d answers named no option; their letters were drawn at random, as lmms-eval does",
                    task.name, fallbacks, len(records))
    return {"mmmu_acc": round(weighted / n, 5) if n else 0, "mmmu_acc_random_fallbacks": fallbacks}


def agg_videomme(task, records):
    """Video-MME perception score: 100 x the share of exactly matching letters (lmms-eval's aggregate)."""
    return {"videomme_perception_score": 100 * sum(s["videomme_exact"] for _, s in records) / len(records),
            "videomme_accuracy": lmms_mean(s["videomme_accuracy"] for _, s in records)}


AGGREGATIONS = {"mean": agg_mean, "mme": agg_mme, "ocrbench": agg_ocrbench, "mmmu": agg_mmmu, "videomme": agg_videomme}
