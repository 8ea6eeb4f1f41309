"""Per-sample scores and aggregates equal lmms-eval 0.7.3's own, on adversarial documents and predictions.

Each family feeds the same documents and raw predictions to lmms-eval's task code (its process_results,
filters, metric and aggregation functions; tests/lmms_eval_reference.py) and to ours (`score_task`,
the function a run scores with), and compares every sample and the aggregate exactly.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parity_cases as C  # noqa: E402
from lmms_eval_reference import LmmsEval, require_lmms_eval  # noqa: E402

from evaluation.runner import score_task  # noqa: E402
from evaluation.tasks import get_task  # noqa: E402
from evaluation.tasks.formats import text_sample  # noqa: E402

require_lmms_eval()
MIN_CASES = 50


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    return LmmsEval()


def ours(name: str, cases, seed: int = 0):
    """Our per-sample scores and metrics for (document, prediction) cases, through `score_task`."""
    task = get_task(name)
    records = [dict(text_sample(task, doc, "qwen2_vl", i), prediction=pred, stats={})
               for i, (doc, pred) in enumerate(cases)]
    out = score_task(task, records, seed=seed)
    return [r["scores"] for r in records], out["metrics"]


def lmms_results(lmms, utils: str, function: str, cases):
    fn = getattr(lmms.utils[utils], function)
    with lmms.active():
        return [fn(copy.deepcopy(doc), [pred.strip()]) for doc, pred in cases]


def check(cases, ours_values, lmms_values):
    assert len(cases) >= MIN_CASES
    mismatches = [(doc, pred, o, t) for (doc, pred), o, t in zip(cases, ours_values, lmms_values) if o != t]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, e.g. {mismatches[:3]}"


def test_docvqa_anls(lmms):
    cases = C.docvqa_cases(random.Random(1))
    scores, metrics = ours("docvqa_val", cases)
    theirs = [float(lmms.metrics.anls(references=doc["answers"], predictions=[p.strip()])["anls"]) for doc, p in cases]
    check(cases, [s["anls"] for s in scores], theirs)
    assert metrics["anls"] == lmms.metrics.mean(theirs)


def test_textvqa_leave_one_out(lmms):
    cases = C.textvqa_cases(random.Random(2))
    scores, metrics = ours("textvqa_val", cases)
    theirs = [r["exact_match"] for r in lmms_results(lmms, "textvqa", "textvqa_process_results", cases)]
    check(cases, [s["exact_match"] for s in scores], theirs)
    assert metrics["exact_match"] == lmms.metrics.mean(theirs)


def test_chartqa_relaxed(lmms):
    cases = C.chartqa_cases(random.Random(3))
    scores, metrics = ours("chartqa", cases)
    theirs = lmms_results(lmms, "chartqa", "chartqa_process_results", cases)
    check(cases, scores, theirs)
    for key in ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"):
        assert metrics[key] == lmms.metrics.mean([r[key] for r in theirs if key in r])


def test_ocrbench_categories(lmms, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lmms-eval's aggregate writes results/ocrbench_results.txt here
    cases = C.ocrbench_cases(random.Random(4))
    scores, metrics = ours("ocrbench", cases)
    theirs = [r["ocrbench_accuracy"] for r in lmms_results(lmms, "ocrbench", "ocrbench_process_results", cases)]
    check(cases, [s["ocrbench_accuracy"] for s in scores], [float(r["score"]) for r in theirs])
    totals = lmms.utils["ocrbench"].OCRBench_score
    monkeypatch.setattr(lmms.utils["ocrbench"], "OCRBench_score", dict.fromkeys(totals, 0))  # it never resets
    assert metrics["ocrbench_accuracy"] == lmms.utils["ocrbench"].ocrbench_aggregate_accuracy(theirs, None)
    assert {c[0]["dataset"] for c in cases} >= {"HME100k"} and metrics["ocrbench_accuracy"] > 0


def test_gqa_exact_match(lmms):
    cases = C.gqa_cases(random.Random(5))
    scores, metrics = ours("gqa", cases)
    theirs = [float(lmms.metrics.exact_match_hf_evaluate(predictions=[p.strip()], references=[doc["answer"]],
                                                          ignore_case=True, ignore_punctuation=True)["exact_match"])
              for doc, p in cases]
    check(cases, [s["exact_match"] for s in scores], theirs)
    assert metrics["exact_match"] == lmms.metrics.mean(theirs)


def _mme_lmms(lmms, cases):
    results = lmms_results(lmms, "mme", "mme_process_results", cases)
    per_sample = [next(iter(r.values()))["score"] for r in results]
    totals = {}
    for key in ("mme_perception_score", "mme_cognition_score"):
        with lmms.active():
            totals[key] = lmms.utils["mme"].mme_aggregate_results([r[key] for r in results if key in r])
    return per_sample, totals


def test_mme_pairs(lmms):
    cases = C.mme_docs_and_preds(random.Random(6))
    scores, metrics = ours("mme", cases)
    per_sample, totals = _mme_lmms(lmms, cases)
    check(cases, [s["mme_acc"] for s in scores], per_sample)
    assert metrics["mme_perception_score"] == totals["mme_perception_score"]
    assert metrics["mme_cognition_score"] == totals["mme_cognition_score"]
    assert metrics["mme_unpaired_questions"] == 0


def test_mme_limit_cutting_a_pair(lmms):
    """lmms-eval stops on an image with one question; we leave it out and count it."""
    cases = C.mme_docs_and_preds(random.Random(6))
    cut = cases[:-1]
    _, metrics = ours("mme", cut)
    with pytest.raises(AssertionError, match="pairwise"):
        _mme_lmms(lmms, cut)
    category = cut[-1][0]["category"]
    complete = [c for c in cut if c[0]["question_id"] != cut[-1][0]["question_id"]]
    _, totals = _mme_lmms(lmms, complete)
    assert metrics["mme_unpaired_questions"] == 1
    assert metrics["mme_cognition_score"] == totals["mme_cognition_score"], category
    assert metrics["mme_perception_score"] == totals["mme_perception_score"]


def _ai2d_doc(options, gold):
    return {"question": "Which label is it?", "options": options, "answer": str(gold)}


def test_ai2d_filter_and_exact_match(lmms):
    cases = C.choice_cases(random.Random(7), 4, _ai2d_doc)
    scores, metrics = ours("ai2d", cases)
    utils = lmms.utils["ai2d"]
    extract = utils.MultiChoiceRegexFilter(regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True,
                                           ignore_punctuation=True)
    theirs = []
    for doc, pred in cases:
        filtered = extract.apply([[pred]], [doc])[0].strip()
        target = utils.ai2d_doc_to_target(doc, "mcq")
        score = lmms.metrics.exact_match_hf_evaluate(predictions=[filtered], references=[target], ignore_case=True,
                                                     ignore_punctuation=True)["exact_match"]
        theirs.append(float(score))
    check(cases, [s["exact_match"] for s in scores], theirs)
    assert metrics["exact_match"] == lmms.metrics.mean(theirs)


def _sqa_doc(options, gold):
    return {"question": "Which one?", "choices": options, "answer": gold, "hint": "", "subject": "natural science"}


def test_scienceqa_letters(lmms):
    cases = C.choice_cases(random.Random(8), 4, _sqa_doc)
    scores, metrics = ours("scienceqa_img", cases)
    theirs = [r["exact_match"] for r in lmms_results(lmms, "scienceqa", "sqa_process_results", cases)]
    check(cases, [s["exact_match"] for s in scores], theirs)
    assert metrics["exact_match"] == lmms.metrics.mean(theirs)


def _realworldqa_doc(options, gold):
    lettered = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options[:4]))
    return {"question": f"Which is it?\n{lettered}\nPlease answer directly with only the letter of the correct option "
                        "and nothing else.", "answer": chr(65 + min(gold, 3))}


def test_realworldqa_letters_and_open_answers(lmms):
    cases = C.choice_cases(random.Random(9), 3, _realworldqa_doc)
    for answer in ("0", "Downhill", "2", " Left "):
        doc = {"question": "How many? Please answer directly with a single word or number.", "answer": answer}
        cases += [(doc, p) for p in (answer, answer.upper(), answer.strip() + ".", "two", "Two.", "", " 0 ", "left")]
    scores, metrics = ours("realworldqa", cases)
    theirs = [r["exact_match"] for r in lmms_results(lmms, "realworldqa", "realworldqa_process_results", cases)]
    check(cases, [s["exact_match"] for s in scores], theirs)
    assert metrics["exact_match"] == lmms.metrics.mean(theirs)


def _videomme_doc(options, gold):
    options = (options * 2)[:4]
    return {"question_id": "001-1", "videoID": "vid", "duration": "short", "domain": "Knowledge",
            "sub_category": "Humanity & History", "task_type": "Counting Problem", "question": "How many?",
            "options": [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)], "answer": chr(65 + min(gold, 3))}


def test_videomme_letters_and_score(lmms):
    cases = C.choice_cases(random.Random(10), 3, _videomme_doc)
    scores, metrics = ours("videomme", cases)
    theirs = [r["videomme_perception_score"] for r in lmms_results(lmms, "videomme", "videomme_process_results", cases)]
    check(cases, [s["videomme_accuracy"] for s in scores], [r["score"] for r in theirs])
    with lmms.active():
        assert metrics["videomme_perception_score"] == lmms.utils["videomme"].videomme_aggregate_results(theirs)


class CountingRandom:
    """The `random` module, counting `choice` calls (MMMU's fallback)."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(random, name)

    def choice(self, seq):
        self.calls += 1
        return random.choice(seq)


@pytest.mark.parametrize("seed", [0, 1234])
def test_mmmu_parsing_fallback_and_aggregate(lmms, monkeypatch, seed):
    cases = C.mmmu_cases(random.Random(11))
    scores, metrics = ours("mmmu_val", cases, seed=seed)
    counting = CountingRandom()
    monkeypatch.setattr(lmms.mcq_utils, "random", counting)
    random.seed(seed)  # lmms-eval seeds `random` once (--seed, 0 by default); serially it scores in doc order
    results = [r["mmmu_acc"] for r in lmms_results(lmms, "mmmu", "mmmu_process_results", cases)]
    utils = lmms.utils["mmmu"]
    theirs = [float(utils.evaluate_mmmu([r])[1]["acc"]) for r in results]
    check(cases, [s["mmmu_acc"] for s in scores], theirs)
    assert metrics["mmmu_acc_random_fallbacks"] == counting.calls > 0
    assert metrics["mmmu_acc"] == utils.mmmu_aggregate_results(results)
