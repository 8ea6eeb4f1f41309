"""Answer extraction as lmms-eval 0.7.3 does it: option letters from free-form answers, MMMU's parsers.

Each benchmark has its own rule in lmms-eval and they differ on purpose-less details (case, order,
fallbacks); these functions keep every one of them, since a lenient or "better" parser would give
numbers that cannot be set beside published lmms-eval ones.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

# --------------------------------------------------------------------------- AI2D and ScienceQA


def ai2d_filter(response: str) -> str:
    """AI2D's filter: the letter of a leading "X." (after white space), else the response unchanged."""
    match = re.match(r"^\s*([A-Z])\.", str(response))
    return match.group(1) if match else str(response)


def scienceqa_choice(response: str) -> str:
    """ScienceQA's reading: the letter of a leading "X." (capital then a period), else the whole response."""
    response = str(response)
    if len(response) >= 2 and response[0].isupper() and response[1] == ".":
        return response[0]
    return response


# --------------------------------------------------------------------------- RealWorldQA and Video-MME

_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is", "best answer is",
    "the correct option is", "correct option is", "the best option is", "best option is", "the choice is",
    "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick", "my answer is",
    "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# a higher rank wins; within a rank, the later position in the answer wins
_FORMAT_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                "space": 2, "fallback": 0}


def mcq_letter(response: str, choices: Sequence[str] = ("A", "B", "C", "D")) -> str:
    """lmms-eval's shared `extract_mcq_answer`: the choice letter by format rank, or "" when none appears.

    Case-sensitive; "(B)", "B.", "B:", "B)", "B " and answer phrases are candidates, a letter opening or
    closing the answer ranks first, and with no candidate any occurrence of a choice letter counts.
    """
    response = str(response)
    if not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        for ch in choices:
            if pattern.format(ch) in text:
                candidates.append((ch, text.rfind(pattern.format(ch)), fmt))
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        index = lowered.find(phrase)
        if index != -1:
            for ch in choices:
                position = text.find(ch, index + len(phrase))
                if position != -1:
                    candidates.append((ch, position, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda c: (_FORMAT_RANK[c[2]], c[1]))[0]


# --------------------------------------------------------------------------- MMMU


def mmmu_choice(response: str, options: Sequence[str], rng: random.Random) -> tuple[str, bool]:
    """MMMU's multiple-choice parser: (letter, whether it was drawn at random).

    "(B)" first, then "B " and "B." as whole-answer tokens, then (for answers over five words) the option
    texts; among several candidates the last one in the answer wins (the first listed on a tie).
    With no candidate the letter is `rng.choice` of all letters, as lmms-eval draws it from the
    `random` module that `--seed` seeds.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = str(response)
    for char in ",.!?;:'":
        text = text.strip(char)
    text = f" {text} "
    by_index, bracketed = True, False
    candidates = [ch for ch in letters if f"({ch})" in text]
    if candidates:
        bracketed = True
    else:
        candidates = [ch for ch in letters if f"{ch} " in text] or [ch for ch in letters if f"{ch}." in text]
    if not candidates and len(text.split()) > 5:
        candidates = [ch for ch, option in zip(letters, options) if str(option).lower() in text.lower()]
        by_index = False
    if not candidates:
        return rng.choice(letters), True
    if len(candidates) == 1:
        return candidates[0], False
    if not by_index:
        positions = [text.lower().rfind(str(options[letters.index(ch)]).lower()) for ch in candidates]
    elif bracketed:
        positions = [text.rfind(f"({ch})") for ch in candidates]
    else:
        positions = [text.rfind(f" {ch} ") for ch in candidates]
    return candidates[positions.index(max(positions))], False


def _numbers_in(text: str) -> list[str]:
    """MMMU's number finder: comma-grouped, scientific, then plain numbers (each list in text order)."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def mmmu_normalize(text: str) -> list:
    """A number (commas dropped, rounded to 2 decimals), or the lower-cased string; a single character
    becomes [" c", "c "] so that it does not match inside words."""
    text = str(text).strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def mmmu_open_candidates(response: str) -> list:
    """MMMU's open-answer parser: per sentence (or line), the shortest tail after a key word ("is ",
    "so ", ... and "=" in the last one), else the whole answer; plus every number in them; normalised."""
    text = str(response).strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for i, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
        shortest = None
        for tail in tails:  # the first of the shortest, where an empty tail is replaced by the next one
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [text]
    candidates = keys + [n for key in keys for n in _numbers_in(key)]
    return list({value for c in candidates for value in mmmu_normalize(c)})


def mmmu_open_correct(answer: str, candidates: list) -> bool:
    """MMMU's eval_open: a candidate string contains a normalised reference string, or a candidate number
    equals a reference number."""
    golds = [g for a in answer for g in mmmu_normalize(a)] if isinstance(answer, list) else mmmu_normalize(answer)
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in golds):
                return True
        elif candidate in golds:
            return True
    return False
