"""Known cases of the evaluation metrics (ANLS, VQA accuracy, relaxed accuracy, choices, MME, OCRBench, MMMU),
worked out by hand from lmms-eval 0.7.3's rules (tests/test_lmms_parity.py runs lmms-eval itself)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import extraction as X  # noqa: E402
from evaluation import metrics as M  # noqa: E402
from evaluation.report import pareto_front  # noqa: E402


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("pred, refs, expected", [
    ("hello", ["hello"], 1.0),
    ("helo", ["hello"], 0.8),                      # 1 edit over 5 characters
    ("Hello World", ["hello world"], 1.0),         # case is normalised
    ("  Helo   World ", ["hello world"], 1 - 1 / 15),  # distance 1, divided by the raw length (15), not 11
    ("ß", ["SS"], 0.0),                             # upper-cased lengths: "ß".upper() == "SS"
    ("abc", ["xyz"], 0.0),
    ("ab", ["abcd"], 0.5),                          # NL = 0.5 exactly: kept (only NL > 0.5 is zeroed)
    ("a", ["abcd"], 0.0),                           # NL = 0.75 -> 0
    ("cat", ["dog", "cats"], 0.75),                 # best reference wins
])
def test_anls(pred, refs, expected):
    assert M.anls(pred, refs) == pytest.approx(expected)


def test_anls_needs_references():
    with pytest.raises(ValueError):
        M.anls("x", [])


def test_vqa_normalisation():
    assert M.vqa_normalize("The Cat.") == "cat"
    assert M.vqa_normalize("two") == "2"
    assert M.vqa_normalize("dont") == "don't"
    assert M.vqa_normalize("1,000") == "1000"
    assert M.vqa_normalize("yes!") == "yes"
    assert M.vqa_normalize("3.5") == "3.5"          # a decimal point is not stripped
    assert M.vqa_normalize("What?") == "what"       # the tokeniser drops "?" and ","
    assert M.vqa_normalize("John's") == "john 's"   # ... and splits "'s"
    # only 32 periods are stripped (lmms-eval passes re.UNICODE where Pattern.sub takes its count)
    assert M.vqa_normalize("a" + "." * 40) == "a" + "." * 8


def test_vqa_accuracy_leave_one_out():
    # 3 of 10 annotators say "two": the 3 subsets without one of them have 2 matches (2/3), the 7 others 3 (1)
    answers = ["two"] * 3 + ["three"] * 7
    assert M.vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # 1 match: 9 subsets with 1/3, 1 subset with 0
    assert M.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert M.vqa_accuracy("cat", ["dog"] + ["cat"] * 9) == pytest.approx(1.0)
    assert M.vqa_accuracy("bird", ["dog"] * 10) == 0.0
    assert M.vqa_accuracy("A dog.", ["dog"]) == 0.0  # one reference leaves no other annotator to agree


@pytest.mark.parametrize("pred, target, expected", [
    ("10.4", "10", 1.0), ("10.6", "10", 0.0), ("9.5", "10", 1.0), ("50%", "0.5", 1.0), ("Yes", "yes", 1.0),
    ("no", "yes", 0.0), ("0", "0", 1.0), ("0.0", "0", 0.0),  # a zero target falls back to string match
    ("Yes", " yes", 0.0),  # the target is not stripped
])
def test_relaxed_accuracy(pred, target, expected):
    assert M.relaxed_accuracy(pred, target) == expected


@pytest.mark.parametrize("response, expected", [
    ("B", "B"), ("b", ""), ("(C)", "C"), ("D.", "D"), ("B. a cat", "B"), ("A) first", "A"),
    ("The answer is D.", "D"), ("I think (A) is right", "A"), ("", ""), ("Z", ""), ("no idea", ""),
    ("A or B", "A"),            # a letter opening the answer outranks one closing it
    ("Dogs are mammals", "D"),  # no candidate format: any capital A-D counts
])
def test_mcq_letter(response, expected):
    assert X.mcq_letter(response) == expected


def test_ai2d_and_scienceqa_readings():
    assert X.ai2d_filter("  C. a cat") == "C" and X.ai2d_filter("(C)") == "(C)"
    assert M.exact_match(X.ai2d_filter("(C)"), ["C"]) == 1.0  # punctuation is ignored by exact_match
    assert X.scienceqa_choice("B. dog") == "B" and X.scienceqa_choice("b. dog") == "b. dog"


def test_mmmu_choice_and_fallback():
    options = ["cat", "dog", "red apple", "pear"]
    assert X.mmmu_choice("(B)", options, random.Random(0)) == ("B", False)
    assert X.mmmu_choice("I think the answer is the red apple of course", options, random.Random(0)) == ("C", False)
    assert X.mmmu_choice("A or B", options, random.Random(0)) == ("B", False)  # the last one wins
    drawn = [X.mmmu_choice("no idea", options, random.Random(3))[0] for _ in range(2)]
    assert drawn[0] == drawn[1] == random.Random(3).choice(["A", "B", "C", "D"])
    assert X.mmmu_choice("no idea", options, random.Random(3))[1] is True


def test_parse_yes_no():
    assert M.parse_yes_no("Yes, there is.") == "yes"
    assert M.parse_yes_no("No.") == "no"
    assert M.parse_yes_no("y") == "yes"
    assert M.parse_yes_no("maybe") == "other"


def test_mme_scores():
    records = [
        # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50
        {"question_id": "existence/1.png", "category": "existence", "score": 1},
        {"question_id": "existence/1.png", "category": "existence", "score": 1},
        {"question_id": "existence/2.png", "category": "existence", "score": 1},
        {"question_id": "existence/2.png", "category": "existence", "score": 0},
        # count: all right -> 200
        {"question_id": "count/1.png", "category": "count", "score": 1},
        {"question_id": "count/1.png", "category": "count", "score": 1},
        # cognition: one image, one right -> acc 50, acc+ 0
        {"question_id": "code/1.png", "category": "code_reasoning", "score": 0},
        {"question_id": "code/1.png", "category": "code_reasoning", "score": 1},
    ]
    out = M.mme_scores(records)
    assert out["categories"]["existence"] == pytest.approx(75 + 50)
    assert out["mme_perception_score"] == pytest.approx(125 + 200)
    assert out["mme_cognition_score"] == pytest.approx(50)
    assert out["mme_total_score"] == pytest.approx(375)
    cut = M.mme_scores(records[:-1])  # --limit cut the last pair: it is left out and counted
    assert cut["mme_cognition_score"] == 0 and cut["unpaired_questions"] == 1


def test_ocrbench():
    assert M.ocrbench_score("The text says HELLO world", ["hello"]) == 1.0
    assert M.ocrbench_score("hallo", ["hello"]) == 0.0
    assert M.ocrbench_score("x ^ { 2 }", ["x^{2}"], source="HME100k") == 1.0
    assert M.ocrbench_score("x ^ { 2 }", ["x^{2}"], source="IIIT5K") == 0.0
    assert M.ocrbench_score("ＡＢＣ", ["abc"]) == 1.0       # full-width folding
    assert M.ocrbench_score("anything", [""]) == 1.0        # an empty reference is contained in every answer
    totals = M.ocrbench_totals([
        {"question_type": "Regular Text Recognition", "score": 1}, {"question_type": "Doc-oriented VQA", "score": 1},
        {"question_type": "Doc-oriented VQA", "score": 0}, {"question_type": "Digit String Recognition", "score": 1},
    ])
    assert totals["ocrbench_final_score"] == 3
    assert totals["ocrbench_text_recognition"] == 2
    assert totals["ocrbench_accuracy"] == pytest.approx(3 / 1000)  # the final score out of the full set's 1000


def test_mmmu_open():
    def correct(pred, answer):
        return X.mmmu_open_correct(answer, X.mmmu_open_candidates(pred))

    assert correct("The answer is 42.", "42")
    assert not correct("42.5", "42")
    assert correct("it is photosynthesis", "photosynthesis")
    assert correct("1,000 units", "1000")
    assert not correct("a", "b") and correct("so it is b", "b")


def test_exact_match_and_agreement():
    assert M.exact_match("Blue!", ["blue"]) == 1.0
    assert M.exact_match("blue sky", ["blue"]) == 0.0
    assert M.exact_match("blue。", ["blue"]) == 0.0  # only ASCII punctuation is ignored
    assert M.agreement(" a  b ", "a b") == 1.0
    assert M.agreement("a", "A") == 0.0


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.1)]
    assert pareto_front(points) == [4, 0, 1]  # (2,0.6) and (3,0.7) are dominated by (2,0.7)
