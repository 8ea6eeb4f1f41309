"""The named pieces tasks refer to: prompt formats, reference builders, scorers, aggregations, loyalty references."""

from __future__ import annotations

import ast
import re
from statistics import mean

from .. import metrics as M

# --------------------------------------------------------------------------- prompt formats
# Each takes (task, row, prompt kwargs) and returns the user text (the visuals go before it).


def _options_list(task, row) -> list[str]:
    value = row.get(task.options) if task.options else None
    if value is None:
        return []
    if isinstance(value, str):  # MMMU stores the options as a Python literal
        value = ast.literal_eval(value)
    return [str(v) for v in value]


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(M.option_letters(len(options)), options))


def fmt_question(task, row, kw):
    return f"{kw.get('pre_prompt', '')}{row[task.question]}{kw.get('post_prompt', '')}"


def fmt_question_capitalized(task, row, kw):
    return f"{kw.get('pre_prompt', '')}{str(row[task.question]).capitalize()}{kw.get('post_prompt', '')}"


def fmt_question_stripped(task, row, kw):
    return f"{kw.get('pre_prompt', '')}{str(row[task.question]).strip()}{kw.get('post_prompt', '')}"


MME_SUFFIX = " Please answer yes or no."


def fmt_mme(task, row, kw):
    question = str(row[task.question]).strip()
    if kw.get("pre_prompt"):
        question = kw["pre_prompt"] + question.replace(MME_SUFFIX, "")
    if kw.get("post_prompt"):
        question = question.replace(MME_SUFFIX, "") + kw["post_prompt"]
    return question


def fmt_mcq(task, row, kw):
    return f"{kw.get('pre_prompt', '')}{row[task.question]}\n{_lettered(_options_list(task, row))}{kw.get('post_prompt', '')}"


def fmt_scienceqa(task, row, kw):
    hint = row.get(task.hint) if task.hint else ""
    context = f"Context: {hint}\n" if hint else ""
    return (f"{kw.get('pre_prompt', '')}{context}{row[task.question]}\n{_lettered(_options_list(task, row))}"
            f"{kw.get('post_prompt', '')}")


def fmt_mmmu(task, row, kw):
    question = str(row[task.question])
    if row.get("question_type") == "multiple-choice":
        return f"{question}\n{_lettered(_options_list(task, row))}\n\n{kw['multiple_choice_prompt']}"
    return f"{question}\n\n{kw['open_ended_prompt']}"


VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


def fmt_videomme(task, row, kw):
    options = "\n".join(_options_list(task, row))  # Video-MME's options already read "A. ..."
    return f"{VIDEOMME_INSTRUCTION}\n{kw.get('pre_prompt', '')}{row[task.question]}\n{options}{kw.get('post_prompt', '')}"


FORMATS = {
    "question": fmt_question, "question_capitalized": fmt_question_capitalized,
    "question_stripped": fmt_question_stripped, "mme": fmt_mme, "mcq": fmt_mcq, "scienceqa": fmt_scienceqa,
    "mmmu": fmt_mmmu, "videomme": fmt_videomme,
}

# --------------------------------------------------------------------------- references


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = ast.literal_eval(text)
                if isinstance(parsed, (list, tuple)):
                    return [str(v) for v in parsed]
            except (ValueError, SyntaxError):
                pass
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def target_field(task, row):
    value = row.get(task.answer)
    return [] if value is None or str(value).strip() == "" else [str(value)]


def target_list(task, row):
    return [a for a in _as_list(row.get(task.answer)) if str(a).strip() != ""]


def target_index_letter(task, row):
    value = row.get(task.answer)
    if value is None or str(value).strip() == "":
        return []
    index = int(value)
    n = len(_options_list(task, row))
    if not 0 <= index < n:
        raise ValueError(f"answer index {index} is outside the {n} options")
    return [M.option_letters(n)[index]]


def target_mmmu(task, row):
    return [a for a in _as_list(row.get(task.answer)) if str(a).strip() != ""]


TARGETS = {"field": target_field, "list": target_list, "index_letter": target_index_letter, "mmmu": target_mmmu}

# --------------------------------------------------------------------------- scorers: (prediction, refs, sample) -> {metric: value}


def _letters(sample) -> list[str]:
    options = sample.get("options") or []
    return M.option_letters(len(options) if options else 4)


def _option_texts(sample) -> list[str]:
    return [re.sub(r"^[A-Z]\.\s*", "", o) for o in sample.get("options") or []]


def score_anls(pred, refs, sample):
    return {"anls": M.anls(pred, refs)}


def score_vqa(pred, refs, sample):
    return {"exact_match": M.vqa_accuracy(pred, refs)}


def score_relaxed(pred, refs, sample):
    s = max(M.relaxed_accuracy(pred, r) for r in refs)
    split = "relaxed_human_split" if sample["meta"].get("type") == "human_test" else "relaxed_augmented_split"
    return {"relaxed_overall": s, split: s}


def score_ocrbench(pred, refs, sample):
    return {"ocrbench_accuracy": M.ocrbench_score(pred, refs, sample["meta"].get("dataset", ""))}


def score_choice(pred, refs, sample):
    choice = M.extract_choice(pred, _letters(sample), _option_texts(sample))
    return {"exact_match": float(choice == refs[0].strip().upper())}


def score_choice_given(pred, refs, sample):
    choice = M.extract_choice(pred, _letters(sample), _option_texts(sample))
    return {"videomme_perception_score": float(choice == refs[0].strip().upper())}


def score_mmmu(pred, refs, sample):
    if sample["meta"].get("question_type") == "multiple-choice":
        choice = M.extract_choice(pred, _letters(sample), _option_texts(sample))
        return {"mmmu_acc": float(choice in [r.strip().upper() for r in refs])}
    return {"mmmu_acc": M.mmmu_open_accuracy(pred, refs)}


def score_yes_no(pred, refs, sample):
    return {"mme_acc": float(M.parse_yes_no(pred) == refs[0].strip().lower().replace(".", ""))}


def score_exact(pred, refs, sample):
    return {"exact_match": M.exact_match(pred, refs)}


def _realworldqa_is_choice(sample) -> bool:
    return bool(sample["answers"]) and sample["answers"][0].strip().upper() in ("A", "B", "C", "D")


def score_realworldqa(pred, refs, sample):
    if _realworldqa_is_choice(sample):
        return {"exact_match": float(M.extract_choice(pred, ["A", "B", "C", "D"]) == refs[0].strip().upper())}
    return {"exact_match": float(str(pred).lower().strip().rstrip(".") == refs[0].strip().lower())}


def score_synthvqa(pred, refs, sample):
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
    "anls": score_anls, "vqa": score_vqa, "relaxed": score_relaxed, "ocrbench": score_ocrbench,
    "choice": score_choice, "choice_given": score_choice_given, "mmmu": score_mmmu, "yes_no": score_yes_no,
    "exact": score_exact, "realworldqa": score_realworldqa, "synthvqa": score_synthvqa,
}


def loyalty_references(task, baseline_prediction: str, sample) -> list[str]:
    """The baseline's answer in the form the task's scorer compares against (a letter, yes/no, or the text)."""
    text = str(baseline_prediction).strip()
    if task.scorer in ("choice", "choice_given") or (
        task.scorer == "mmmu" and sample["meta"].get("question_type") == "multiple-choice"
    ) or (task.scorer == "realworldqa" and _realworldqa_is_choice(sample)):
        letters = ["A", "B", "C", "D"] if task.scorer == "realworldqa" else _letters(sample)
        return [M.extract_choice(text, letters, _option_texts(sample))]
    if task.scorer == "yes_no":
        return [M.parse_yes_no(text)]
    if task.scorer == "realworldqa":
        return [text.lower().rstrip(".")]
    return [text]


# --------------------------------------------------------------------------- aggregations: [(sample, scores)] -> metrics


def agg_mean(task, records):
    keys = sorted({k for _, scores in records for k in scores})
    return {k: mean(s[k] for _, s in records if k in s) for k in keys}


def agg_mme(task, records):
    out = agg_mean(task, records)
    totals = M.mme_scores(
        {"question_id": sample["id"], "category": sample["meta"].get("category"), "score": scores["mme_acc"]}
        for sample, scores in records
    )
    out.update({k: v for k, v in totals.items() if k != "categories"})
    out["mme_categories"] = totals["categories"]
    return out


def agg_ocrbench(task, records):
    totals = M.ocrbench_totals(
        {"question_type": sample["meta"].get("question_type", ""), "score": scores["ocrbench_accuracy"]}
        for sample, scores in records
    )
    return {k: v for k, v in totals.items()}


AGGREGATIONS = {"mean": agg_mean, "mme": agg_mme, "ocrbench": agg_ocrbench}
