"""Adversarial documents and predictions for the lmms-eval parity tests: hand-written edge cases plus
seeded mutations (case, white space, ASCII and Unicode punctuation, articles, number formats, answer
phrases, every letter form). Documents follow each Hub dataset's schema."""

from __future__ import annotations

import random

UNICODE_PUNCT = ("。", "，", "！", "？", "“", "”", "‘", "’", "…", "—", "：", "；", "\u00a0", "\u3000")


def mutate(text: str, rng: random.Random) -> str:
    """`text` with one to three seeded edits a model's answer might carry."""
    edits = [
        str.upper, str.lower, str.title, lambda t: f"  {t}  ", lambda t: t + ".", lambda t: t + "!",
        lambda t: t + rng.choice(UNICODE_PUNCT), lambda t: rng.choice(UNICODE_PUNCT) + t, lambda t: f'"{t}"',
        lambda t: f"“{t}”", lambda t: "The answer is " + t, lambda t: "Answer: " + t, lambda t: "the " + t,
        lambda t: "a " + t, lambda t: t.replace(" ", "  "), lambda t: t.replace(" ", "\n"), lambda t: t + "\n\nBecause.",
        lambda t: t.replace("0", "O"), lambda t: t[:-1] if len(t) > 1 else t, lambda t: t + "s", lambda t: t + "'s",
        lambda t: t.replace(",", ""), lambda t: t + ",", lambda t: "(" + t + ")", lambda t: t + "?",
        lambda t: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in t),  # full-width ASCII
    ]
    for _ in range(rng.randint(1, 3)):
        text = rng.choice(edits)(text)
    return text


def letter_forms(gold: str, other: str, option: str) -> list[str]:
    """Ways a model writes (or almost writes) option `gold`; `other` is a wrong letter, `option` gold's text."""
    g, o, lo = gold, other, gold.lower()
    return [
        g, lo, f"{g}.", f"{g})", f"({g})", f"[{g}]", f"{g}:", f"{g}. {option}", f"{g}) {option}", f"({g}) {option}",
        f"Answer: {g}", f"The answer is {g}", f"The answer is ({g}).", f"answer: {lo}", f"Option {g}", f"{g} or {o}",
        f"{o} or {g}", f"I think {g}", option, f"The answer is {option}", chr(ord(g) + 0xFEE0), f"{g}。", f" {g} ",
        f"\n{g}\n", "", "None of the above", f"**{g}**", f"{g}\n\nExplanation: {o} is wrong.",
        f"It is {g} because {o} is wrong", f"{g}{g}", f"{g} is correct", f"Both {g} and {o}",
        f"({o}) is wrong, ({g}) is right", f"{o}. no wait, {g}.", f"Choice: {g}", f"I choose {g}", f"答案是{g}",
        f"选{g}", f"{g}a", f"Letter {g}", f"The correct option is {lo}", f"{g}, {option}", f"'{g}'", f'"{g}"',
        f"{g}!", f"{option}.", f"{option.upper()} is my answer for this question", f"Between {o} and {g} I pick {g}",
        f"{g}\t", "Dogs", "I don't know", "E", f"{g}/{o}",
    ]


# --------------------------------------------------------------------------- per-family documents


def docvqa_cases(rng):
    answers = [["Hello World"], ["ß"], ["İstanbul"], ["12,000", "12000"], ["$5.00"], ["a"], ["the cat"], ["ab", "abcd"],
               ["  spaced  out "], ["MIXED case Text"], ["1/2/2019", "01/02/2019"], [""], ["x" * 30], ["Ǆ"]]
    cases = []
    for i, refs in enumerate(answers):
        doc = {"questionId": str(100 + i), "question": f"What is item {i}?", "answers": refs}
        preds = ["", refs[0], refs[-1].upper(), " " + refs[0] + " ", "abcd"[: 1 + i % 4], "ab"]
        preds += [mutate(refs[0], rng) for _ in range(4)]
        cases += [(doc, p) for p in preds]
    return cases


def textvqa_cases(rng):
    vocab = ["two", "2", "the dog", "dog", "Dog's", "dogs", "coca-cola", "coca cola", "1,000", "1000", "yes", "don't",
             "dont", "3.5", "a.m.", "U.S.A", "hello, world", "what?", "10", "ten"]
    cases = []
    for i in range(16):
        n = (10, 10, 10, 1, 3, 5)[i % 6]
        answers = [rng.choice(vocab) for _ in range(n)]
        doc = {"question_id": i, "question": f"what is written on sign {i}?", "answers": answers}
        preds = [answers[0], rng.choice(vocab), mutate(answers[0], rng), mutate(rng.choice(vocab), rng), ""]
        cases += [(doc, p) for p in preds]
    doc = {"question_id": 99, "question": "q", "answers": ["a" + "." * 40] * 10}
    return cases + [(doc, "a" + "." * 40), (doc, "a" + "." * 8), (doc, "a")]


def chartqa_cases(rng):
    targets = ["10", "0", "0.5", "50%", " Yes", "Yes", "1e3", "-3.2", "1,000", "12.5%", "nan", "inf", "North", "2019"]
    cases = []
    for i, target in enumerate(targets):
        doc = {"type": ("human_test", "augmented_test")[i % 2], "question": f"Value {i}?", "answer": target}
        preds = [target, "10.4", "10.6", "9.5", "0.0", "50%", "0.5", "yes", "1000", "-3.1", "1_000", "  12.5%  ", "nan",
                 "inf", "Infinity", mutate(target, rng), ""]
        cases += [(doc, p) for p in preds]
    return cases


def ocrbench_cases(rng):
    types = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
             "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
             "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
             "Handwritten Mathematical Expression Recognition")
    answers = [["hello"], ["HELLO world"], ["x^{2}", "x ^ { 2 }"], [""], ["ＡＢＣ"], ["abc"], ["line\nbreak"], "plain string",
               ["a b c"], ["\\frac { 1 } { 2 }"]]
    cases = []
    for i, answer in enumerate(answers * 2):
        hme = i % 3 == 0
        doc = {"dataset": "HME100k" if hme else ("IIIT5K", "FUNSD", "docVQA")[i % 3], "question": f"  what is {i}?\n",
               "question_type": types[9] if hme else types[i % 9], "answer": answer}
        first = answer if isinstance(answer, str) else answer[0]
        preds = [first, first.upper(), first.replace(" ", ""), f"The text is: {first}.", "", "ABC", "x^{2}",
                 mutate(first, rng)]
        cases += [(doc, p) for p in preds]
    return cases


def gqa_cases(rng):
    answers = ["yes", "no", "left", "red", "the dog", "t-shirt", "Blue", "coffee table", "2", "man's hat", "café"]
    cases = []
    for i, answer in enumerate(answers):
        doc = {"id": str(i), "imageId": f"n{i}", "question": f"What is {i}?", "answer": answer}
        preds = [answer, answer.upper(), answer + ".", f"'{answer}'", answer + "。", "a " + answer, answer.replace(" ", ""),
                 mutate(answer, rng), mutate(answer, rng), ""]
        cases += [(doc, p) for p in preds]
    return cases


def mme_docs_and_preds(rng):
    """Image pairs (a yes and a no question each) over perception and cognition categories."""
    categories = ("existence", "count", "OCR", "artwork", "commonsense_reasoning", "code_reasoning", "text_translation")
    preds = ["Yes", "yes.", "Y", "n", "No, there is not.", "Not sure", "maybe", "", "YES!", "nope", "no", "Yes it is",
             " No ", "N.", "y.", "Noted", "I cannot tell. Yes", "yes\n", "Nein", "Ye s"]
    cases = []
    for i in range(30):
        category = categories[i % len(categories)]
        for j, answer in enumerate(("Yes", "No")):
            question = f"Is there a thing {i}? Please answer yes or no." if (i + j) % 3 else f" Is there {i}?  "
            doc = {"question_id": f"{category}/{i:04d}.png", "category": category, "question": question,
                   "answer": answer if i % 5 else answer + "."}
            cases.append((doc, rng.choice(preds)))
    return cases


def choice_docs(rng, n_docs: int):
    """(options, gold index) for multiple-choice documents."""
    texts = ["cat", "dog", "red apple", "pear", "B vitamins", "A minor", "Sun", "None of these", "42", "Dogs"]
    docs = []
    for _ in range(n_docs):
        k = rng.randint(2, 5)
        options = rng.sample(texts, k)
        docs.append((options, rng.randrange(k)))
    return docs


def choice_cases(rng, n_docs: int, build):
    """Every letter form of each document's gold option (and a wrong letter), for document builder `build`."""
    cases = []
    for options, gold in choice_docs(rng, n_docs):
        letter, other = chr(65 + gold), chr(65 + (gold + 1) % len(options))
        doc = build(options, gold)
        cases += [(doc, p) for p in rng.sample(letter_forms(letter, other, options[gold]), 20)]
    return cases


def mmmu_cases(rng):
    subjects = ["Art_Theory", "Accounting", "Math", "Basic_Medical_Science", "Physics"]
    cases = []
    for i, (options, gold) in enumerate(choice_docs(rng, 8)):
        doc = {"id": f"validation_{subjects[i % 5]}_{i + 1}", "question_type": "multiple-choice",
               "question": f"<image 1> Which is it {i}?", "options": str(options), "answer": chr(65 + gold)}
        forms = letter_forms(chr(65 + gold), chr(65 + (gold + 1) % len(options)), options[gold])
        cases += [(doc, p) for p in rng.sample(forms, 12)]
    open_answers = ["42", "1,000", "3.14159", "photosynthesis", "x", "-2", "1e3", "['24/7', '3.429']", "5 cm", "0.5"]
    open_preds = ["The answer is 42.", "So the result is 1000", "3.14", "it is photosynthesis.", "x", "The value is -2",
                  "1000", "24/7", "5", "1/2", "The answer is x = 5", "Therefore, 0.50", "", "I think it could be 5 cm"]
    for i, answer in enumerate(open_answers):
        doc = {"id": f"validation_{subjects[i % 5]}_{100 + i}", "question_type": "open", "question": f"How much {i}?",
               "options": "[]", "answer": answer}
        cases += [(doc, p) for p in [answer, mutate(answer, rng)] + rng.sample(open_preds, 4)]
    return cases
