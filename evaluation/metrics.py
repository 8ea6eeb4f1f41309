"""Per-sample scores and aggregations, each the one lmms-eval 0.7.3 computes for its tasks.

Where lmms-eval departs from a benchmark's official scorer, these follow lmms-eval (docs/evaluation.md
lists the departures); the differential tests in tests/test_lmms_parity*.py hold them to it. Answer
extraction for multiple choice and MMMU lives in `evaluation/extraction.py`.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from statistics import mean
from typing import Iterable, Sequence

# --------------------------------------------------------------------------- ANLS (DocVQA)


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction against its references, as lmms-eval.

    The edit distance is taken between the lower-cased, white-space-collapsed strings, but divided by
    the longer of the *raw* strings' upper-cased lengths (lmms-eval's `anls`); a similarity below
    `threshold` counts as 0.
    """
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    prediction = str(prediction)
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        answer = str(answer)
        length = max(len(answer.upper()), len(prediction.upper()))
        gt = " ".join(answer.strip().lower().split())
        distances.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
    score = 1 - min(distances)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------------- VQA accuracy (TextVQA)

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official script's pattern
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# lmms-eval passes re.UNICODE (32) where `Pattern.sub` takes its count: at most 32 periods are stripped
_PERIOD_STRIP_COUNT = 32


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """lmms-eval's EvalAI answer processing: tokenise (lower-case, drop `,` and `?`, split `'s`), then the
    official VQA punctuation, digit, article and contraction rules."""
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: min(#matching other annotators / 3, 1), averaged over leaving each annotator out.

    As in lmms-eval a single reference scores 0 (no other annotator is left to match).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    return mean(min(1, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts)))


# --------------------------------------------------------------------------- relaxed accuracy (ChartQA)


def _to_float(text: str):
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """1.0 when a numeric prediction is within 5% of a non-zero numeric target, else a case-insensitive
    string match. Neither string is stripped (lmms-eval strips only the prediction, before this)."""
    prediction, target = str(prediction), str(target)
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_change)
    return float(prediction.lower() == target.lower())


# --------------------------------------------------------------------------- exact match (GQA, AI2D)

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """lmms-eval's `exact_match` with ignore_case and ignore_punctuation: lower-case, drop ASCII punctuation."""
    return str(text).lower().translate(_NO_PUNCTUATION)


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) for a in answers))


# --------------------------------------------------------------------------- MME


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(response: str) -> str:
    """'yes', 'no' or 'other', as the MME (Otter) evaluation parses an answer."""
    pred = str(response).lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[dict]) -> dict:
    """MME totals from per-sample records {question_id, category, score (0/1)}, as lmms-eval sums them.

    Per image (question_id): acc (mean of its two answers, x100) + acc+ (both right, x100); a category
    scores the mean over its images; perception is the sum over its ten categories, cognition over the rest.
    lmms-eval stops on an image with one question (e.g. --limit cut its pair); here such questions are
    left out of the totals and counted in `unpaired_questions`.
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for r in records:
        by_cat[r["category"]].setdefault(str(r["question_id"]), []).append(float(r["score"]))
    per_category, unpaired = {}, 0
    for cat, questions in by_cat.items():
        total, n_images = 0.0, 0
        for scores in questions.values():
            if len(scores) != 2:
                unpaired += len(scores)
                continue
            total += (sum(scores) == 2) * 100.0 + sum(scores) / len(scores) * 100.0
            n_images += 1
        if n_images:
            per_category[cat] = total / n_images
    perception = sum(v for c, v in per_category.items() if c in MME_PERCEPTION)
    cognition = sum(v for c, v in per_category.items() if c not in MME_PERCEPTION)  # lmms-eval: all the others
    return {"mme_perception_score": perception, "mme_cognition_score": cognition,
            "mme_total_score": perception + cognition, "categories": per_category, "unpaired_questions": unpaired}


# --------------------------------------------------------------------------- OCRBench


def _fold_fullwidth(text: str) -> str:
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c) for c in text)


def ocrbench_score(prediction: str, answers: Sequence[str] | str, source: str = "") -> float:
    """1 when a reference answer is contained in the prediction (OCRBench's rule, as lmms-eval applies it).

    HME100k (handwritten math) compares with all spaces removed, the others case-insensitively with
    full-width ASCII folded. An empty reference is contained in every prediction.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = str(prediction).strip()
    for answer in answers:
        if source == "HME100k":
            a = str(answer).strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = _fold_fullwidth(str(answer)).lower().strip().replace("\n", " ")
            p = _fold_fullwidth(pred).lower().strip().replace("\n", " ")
        if a in p:
            return 1.0
    return 0.0


OCRBENCH_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                        "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
OCRBENCH_TYPES = OCRBENCH_RECOGNITION + ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                                         "Handwritten Mathematical Expression Recognition")
OCRBENCH_FULL_SCORE = 1000  # lmms-eval's accuracy is the final score over the full set's 1000, whatever --limit


def ocrbench_totals(records: Iterable[dict]) -> dict:
    """OCRBench final score (the number of correct answers) per question type, and accuracy = final / 1000."""
    per_type = dict.fromkeys(OCRBENCH_TYPES, 0.0)
    for r in records:
        if r["question_type"] not in per_type:
            raise ValueError(f"unknown OCRBench question type {r['question_type']!r}; "
                             f"known: {', '.join(OCRBENCH_TYPES)}")
        per_type[r["question_type"]] += r["score"]
    recognition = sum(per_type[k] for k in OCRBENCH_RECOGNITION)
    final = recognition + sum(per_type[k] for k in OCRBENCH_TYPES[len(OCRBENCH_RECOGNITION):])
    return {"ocrbench_final_score": final, "ocrbench_text_recognition": recognition,
            "ocrbench_accuracy": final / OCRBENCH_FULL_SCORE, "question_types": per_type}


# --------------------------------------------------------------------------- agreement


def agreement(a: str, b: str) -> float:
    """Exact-match agreement of two generations (white space collapsed, case kept)."""
    return float(" ".join(str(a).split()) == " ".join(str(b).split()))
