"""SynthVQA: a seeded synthetic visual question-answering benchmark drawn with PIL.

Every sample is a function of (split, index) alone: `make_sample("test", 17)` is the same image,
question and answers on every machine. A scene is a 4 x 4 grid of 56-pixel cells
on a lightly tinted background with grey clutter lines and dots. A cell holds nothing, a shape
(circle, square, triangle, diamond; six colours; big or small) or a short rendered word or
two-digit number (PIL's built-in bitmap font, scaled x2 with nearest-neighbour, so no font file is
needed and the pixels are the same on every Pillow >= 10.1). Rows and columns are numbered 1-4
from the top left, and the numbers are printed in a top and a left margin (the image is 252 x 252):
Qwen2-VL's vision encoder has only relative (rotary) positions, so "row 2 column 3" must be
findable from what is drawn, as on a chart or a table.

Question types (each stresses different tokens):

- `attribute`: colour, shape or size of the object in a named cell (the cell's visual tokens).
- `count`: how many shapes of a colour, or of a kind, there are (all visual tokens).
- `relation`: where one shape is relative to another (left/right/above/below; two regions).
- `ocr`: what word or number is written (fine detail in a few tokens).
- `long_context`: a dense grid, then a long block of irrelevant notes, then at the END a question
  about one cell, answered "<size> <colour> <shape>" (three tokens). The first answer token is
  computed with the full prompt during prefill; the next two must be read again from the kept
  cache, so a recency-only cache that dropped the image gets them wrong while a question-aware one
  (SnapKV) that kept the cell's tokens gets them right.

Splits are `datasets.Dataset`s with the columns of real VQA tasks: question_id, image, question,
answers (list of str), question_type. `exact_match` and `accuracy` score predictions.
"""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

GRID = 4
CELL = 56
MARGIN = 28  # the top and left margins hold the column and row numbers
IMAGE_SIZE = MARGIN + GRID * CELL  # 252: 9 x 9 tokens of 28 pixels (Qwen2-VL's merged tokens, the LLaVA patches)

COLORS = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (250, 120, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("big", "small")
WORDS = ("cat", "dog", "sun", "tree", "fish", "book", "star", "moon", "bird", "door", "lamp", "ship",
         "rain", "king", "gold", "wolf", "cake", "milk", "road", "frog")
QUESTION_TYPES = ("attribute", "count", "relation", "ocr", "long_context")
# Training only (never in validation or test): a dense description of every cell. Its ~100 supervised
# answer tokens per image make the vision encoder carry each cell's content from the first steps; with
# one-token answers alone, models trained from scratch collapsed the visual tokens to a constant.
TRAINING_TYPES = QUESTION_TYPES + ("describe",)
DESCRIBE_QUESTION = "Describe every cell of the grid."
# Per-channel mean and std of the training images (RGB, in [0, 1]; measured on 300 of them). The
# processors normalise with these, so the near-white background is near zero and the shapes stand out.
IMAGE_MEAN = (0.90, 0.89, 0.89)
IMAGE_STD = (0.17, 0.18, 0.21)
SPLITS = {"train": 0, "validation": 1, "test": 2, "test_hard": 3, "validation_hard": 4}
SPLIT_SIZES = {"train": 20000, "validation": 600, "test": 1000, "test_hard": 1000, "validation_hard": 600}
# Splits whose prompts are longer than the regular ones: every question comes after a block of irrelevant
# notes, and the long-context notes are twice as long (`_lengthen`). Not part of build_dataset's three.
HARD_SPLITS = ("test_hard", "validation_hard")

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

# Irrelevant notes for the long-context questions: about 150-200 tokens of plausible text.
_NOTE_SUBJECTS = ("the lamp", "the old map", "a green door", "the garden", "my neighbour", "the red car",
                  "the small boat", "a tall tower", "the market", "the blue house", "the kitchen", "the river")
_NOTE_VERBS = ("is near", "was painted next to", "looks older than", "is far from", "was moved behind",
               "is bigger than", "stands beside", "was found under")
_NOTE_OBJECTS = ("the bridge", "the station", "a quiet park", "the school", "the harbour", "an empty shop",
                 "the library", "the hill", "a wooden fence", "the museum", "the lake", "the bakery")


def _row_col(cell: int) -> tuple[int, int]:
    return cell // GRID + 1, cell % GRID + 1


def _cell_center(row: int, col: int) -> tuple[float, float]:
    return MARGIN + (col - 0.5) * CELL, MARGIN + (row - 0.5) * CELL


def _where(cell: int) -> str:
    row, col = _row_col(cell)
    return f"row {row} column {col}"


# The questions' wording, shared by the benchmark's builders and the training follow-ups.
OCR_QUESTIONS = ("What is written in the grid?", "What word or number is written in the grid?")


def _attribute_question(cell: int, kind: str) -> str:
    if kind == "shape":
        return f"What shape is in {_where(cell)}?"
    return f"What {kind} is the shape in {_where(cell)}?"


def _count_question(target: str) -> str:
    return f"How many {target} shapes are there?" if target in COLORS else f"How many {target}s are there?"


def _relation_question(a: tuple, b: tuple) -> str:
    """Where object `a` = (size, colour, shape) is relative to object `b`."""
    return f"Where is the {a[1]} {a[2]} relative to the {b[1]} {b[2]}?"


def _relation_answer(a: int, b: int) -> str:
    """Where cell `a` is relative to cell `b`, which shares its row or its column."""
    (ra, ca), (rb, cb) = _row_col(a), _row_col(b)
    return ("left" if ca < cb else "right") if ra == rb else ("above" if ra < rb else "below")


# --------------------------------------------------------------------------- drawing


@lru_cache(maxsize=1)
def bitmap_font():
    """PIL's built-in bitmap font (the same embedded glyphs in every Pillow version that has it)."""
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


@lru_cache(maxsize=256)
def _glyph_mask(text: str, scale: int = 2) -> Image.Image:
    font = bitmap_font()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, fill=255, font=font)
    return mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(scene: dict, rng: random.Random) -> Image.Image:
    """Draw a scene: {"objects": {cell: (size, colour, shape)}, "text": (cell, string) or None}."""
    tint = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tint)
    draw = ImageDraw.Draw(image)
    # the frame: faint grid lines, column numbers along the top, row numbers down the left
    for k in range(GRID + 1):
        z = MARGIN + k * CELL
        draw.line([(MARGIN, z), (IMAGE_SIZE, z)], fill=(205, 205, 205), width=1)
        draw.line([(z, MARGIN), (z, IMAGE_SIZE)], fill=(205, 205, 205), width=1)
    for k in range(1, GRID + 1):
        mask = _glyph_mask(str(k))
        cx, cy = _cell_center(k, k)
        image.paste((60, 60, 60), (int(cx - mask.width / 2), int(MARGIN / 2 - mask.height / 2)), mask)
        image.paste((60, 60, 60), (int(MARGIN / 2 - mask.width / 2), int(cy - mask.height / 2)), mask)
    for _ in range(rng.randint(3, 8)):  # clutter: thin grey lines and dots that are not objects
        g = rng.randint(150, 210)
        pts = [(rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)) for _ in range(2)]
        draw.line(pts, fill=(g, g, g), width=1)
    for _ in range(rng.randint(5, 20)):
        g = rng.randint(120, 200)
        x, y = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(g, g, g))
    for cell, (size, color, shape) in scene["objects"].items():
        row, col = _row_col(cell)
        r = (rng.uniform(19, 23) if size == "big" else rng.uniform(10, 13))
        jitter = CELL / 2 - r - 3
        cx, cy = _cell_center(row, col)
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    if scene.get("text"):
        cell, text = scene["text"]
        row, col = _row_col(cell)
        mask = _glyph_mask(text)
        shade = rng.randint(0, 60)
        cx, cy = _cell_center(row, col)
        x = int(cx - mask.width / 2) + rng.randint(-2, 2)
        y = int(cy - mask.height / 2) + rng.randint(-8, 8)
        image.paste((shade, shade, shade), (x, y), mask)
    return image


# --------------------------------------------------------------------------- scenes and questions


def _random_objects(rng: random.Random, cells: list[int], exclude=()) -> dict:
    """Objects with distinct (colour, shape) pairs in `cells`, avoiding the pairs in `exclude`."""
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(exclude)]
    chosen = rng.sample(pairs, len(cells))
    return {cell: (rng.choice(SIZES), c, s) for cell, (c, s) in zip(cells, chosen)}


def _maybe_text(rng: random.Random, free: list[int], p: float = 0.3):
    if free and rng.random() < p:
        return (rng.choice(free), _random_text(rng))
    return None


def _random_text(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.6 else str(rng.randint(10, 99))


def _notes(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(14, 18)):
        lines.append(f"{rng.choice(_NOTE_SUBJECTS)} {rng.choice(_NOTE_VERBS)} {rng.choice(_NOTE_OBJECTS)}.")
    return "Notes: " + " ".join(lines)


def _lengthen(question: str, rng: random.Random) -> str:
    """The hard splits' question: a notes block before a short question, a second one in long-context notes."""
    notes = _notes(rng)
    if question.startswith("Notes: "):
        return notes + " " + question[len("Notes: "):]
    return f"{notes}\nIgnore the notes. {question}"


def _attribute(rng):
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    n = rng.randint(3, 9)
    objects = _random_objects(rng, cells[:n])
    text = _maybe_text(rng, cells[n:])
    cell = rng.choice(cells[:n])
    size, color, shape = objects[cell]
    kind = rng.choice(("color", "color", "shape", "shape", "size"))
    answer = {"color": color, "shape": shape, "size": size}[kind]
    return {"objects": objects, "text": text}, _attribute_question(cell, kind), answer


def _count(rng):
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    k = rng.randint(0, 4)
    by_color = rng.random() < 0.5
    if by_color:
        target = rng.choice(list(COLORS))
        hits = rng.sample([(target, s) for s in SHAPES], k)
        others = [(c, s) for c in COLORS for s in SHAPES if c != target]
    else:
        target = rng.choice(SHAPES)
        hits = rng.sample([(c, target) for c in COLORS], k)
        others = [(c, s) for c in COLORS for s in SHAPES if s != target]
    question = _count_question(target)
    m = rng.randint(max(0, 2 - k), 8 - k)
    pairs = hits + rng.sample(others, m)
    objects = {cell: (rng.choice(SIZES), c, s) for cell, (c, s) in zip(cells, pairs)}
    text = _maybe_text(rng, cells[len(pairs):])
    return {"objects": objects, "text": text}, question, str(k)


def _relation(rng):
    a = rng.randrange(GRID * GRID)
    ra, ca = _row_col(a)
    if rng.random() < 0.5:  # same row, another column
        cb = rng.choice([c for c in range(1, GRID + 1) if c != ca])
        b = (ra - 1) * GRID + cb - 1
    else:
        rb = rng.choice([r for r in range(1, GRID + 1) if r != ra])
        b = (rb - 1) * GRID + ca - 1
    rest = [c for c in range(GRID * GRID) if c not in (a, b)]
    rng.shuffle(rest)
    n = rng.randint(0, 6)
    objects = _random_objects(rng, [a, b] + rest[:n])
    text = _maybe_text(rng, rest[n:])
    return {"objects": objects, "text": text}, _relation_question(objects[a], objects[b]), _relation_answer(a, b)


def _ocr(rng):
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    n = rng.randint(2, 8)
    objects = _random_objects(rng, cells[:n])
    word = _random_text(rng)
    question = rng.choice(OCR_QUESTIONS)
    return {"objects": objects, "text": (cells[n], word)}, question, word


def _long_context(rng):
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    n = rng.randint(10, 14)
    objects = _random_objects(rng, cells[:n])
    cell = rng.choice(cells[:n])
    size, color, shape = objects[cell]
    question = f"{_notes(rng)}\nIgnore the notes. Describe the shape in {_where(cell)}."
    return {"objects": objects, "text": None}, question, f"{size} {color} {shape}"


def _describe(rng):
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    n = rng.randint(3, 12)
    objects = _random_objects(rng, cells[:n])
    text = _maybe_text(rng, cells[n:], p=0.5)
    parts = []
    for cell in range(GRID * GRID):
        if cell in objects:
            content = " ".join(objects[cell])
        elif text and text[0] == cell:
            content = text[1]
        else:
            content = "empty"
        parts.append(f"{_where(cell)}: {content}.")
    return {"objects": objects, "text": text}, DESCRIBE_QUESTION, " ".join(parts)


_BUILDERS = {"attribute": _attribute, "count": _count, "relation": _relation, "ocr": _ocr,
             "long_context": _long_context, "describe": _describe}


def _draw(split: str, index: int, question_type: str | None):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    qtype = question_type or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    if qtype not in _BUILDERS:
        raise ValueError(f"unknown question type {qtype!r}; choose one of {TRAINING_TYPES}")
    rng = random.Random(f"synthvqa/{split}/{index}/{qtype}")
    scene, question, answer = _BUILDERS[qtype](rng)
    if split in HARD_SPLITS:
        question = _lengthen(question, rng)
    return qtype, scene, question, answer, render(scene, rng), rng


def make_sample(split: str, index: int, question_type: str | None = None) -> dict:
    """Sample `index` of `split`: {question_id, image, question, answers, question_type}.

    The type is `QUESTION_TYPES[index % 5]` unless given, so every split is balanced; the
    training-only type "describe" is drawn only when asked for.
    """
    qtype, _, question, answer, image, _ = _draw(split, index, question_type)
    return {"question_id": f"{split}-{index:06d}", "image": image, "question": question, "answers": [answer],
            "question_type": qtype}


# Follow-up kinds drawn by default (uniformly), and training-only ones drawn only when given a weight.
FOLLOW_UP_KINDS = ("attribute", "locate", "count", "relation", "ocr")
EXTRA_FOLLOW_UP_KINDS = ("locate_pair", "row_of", "column_of", "same_line")


def follow_up_weights(**given: float) -> dict:
    """Every follow-up kind's weight: 1 for FOLLOW_UP_KINDS and 0 for EXTRA_FOLLOW_UP_KINDS, unless given."""
    weights = dict.fromkeys(FOLLOW_UP_KINDS, 1.0) | dict.fromkeys(EXTRA_FOLLOW_UP_KINDS, 0.0)
    unknown = set(given) - set(weights)
    if unknown:
        raise ValueError(f"unknown follow-up kinds {sorted(unknown)}; choose from {list(weights)}")
    bad = {kind: w for kind, w in given.items() if not w >= 0}
    if bad:
        raise ValueError(f"follow-up weights must be >= 0, got {bad}")
    return weights | {kind: float(w) for kind, w in given.items()}


def scene_questions(scene: dict, rng: random.Random, k: int, weights: dict | None = None) -> list[tuple[str, str]]:
    """Up to `k` more (question, answer) pairs about `scene`, worded as the benchmark words them.

    Training asks them as follow-up turns about the same image: each image (whose encoding is most of
    a training step's cost) then teaches several answers instead of one. Each pair's question type is
    drawn first, uniformly among those the scene allows, so that attribute questions (three per object)
    do not crowd out the slower-learned count and relation ones. A training-only kind, "Where is the
    red circle?" -> "row 2 column 3", teaches the step that relation questions need twice: from an
    object's looks to its position (the other questions only go from a position to the looks).

    `weights` (from `follow_up_weights`) draws the kinds unevenly, and only with it do the steps of a
    relation question come up as questions of their own (EXTRA_FOLLOW_UP_KINDS): "locate_pair", "Where
    are the red circle and the blue square?" -> "row 1 column 2 and row 3 column 2"; and, answered in one
    token as a relation question must be, "row_of" / "column_of", "Which row is the red circle in?" ->
    "1", and "same_line", "Are the red circle and the blue square in the same row?" -> "yes".
    """
    objects, text = scene["objects"], scene.get("text")
    pools = {kind: [] for kind in FOLLOW_UP_KINDS + EXTRA_FOLLOW_UP_KINDS}
    for cell, (size, color, shape) in objects.items():
        pools["attribute"] += [(_attribute_question(cell, kind), answer)
                               for kind, answer in (("color", color), ("shape", shape), ("size", size))]
        pools["locate"].append((f"Where is the {color} {shape}?", _where(cell)))
        row, col = _row_col(cell)
        pools["row_of"].append((f"Which row is the {color} {shape} in?", str(row)))
        pools["column_of"].append((f"Which column is the {color} {shape} in?", str(col)))
    for color in COLORS:
        pools["count"].append((_count_question(color), str(sum(c == color for _, c, _ in objects.values()))))
    for shape in SHAPES:
        pools["count"].append((_count_question(shape), str(sum(s == shape for _, _, s in objects.values()))))
    for a in objects:
        for b in objects:
            (ra, ca), (rb, cb) = _row_col(a), _row_col(b)
            if a != b and (ra == rb or ca == cb):
                pools["relation"].append((_relation_question(objects[a], objects[b]), _relation_answer(a, b)))
            if a != b:
                pair = f"the {objects[a][1]} {objects[a][2]} and the {objects[b][1]} {objects[b][2]}"
                pools["locate_pair"].append((f"Where are {pair}?", f"{_where(a)} and {_where(b)}"))
                pools["same_line"] += [(f"Are {pair} in the same {line}?", "yes" if same else "no")
                                       for line, same in (("row", ra == rb), ("column", ca == cb))]
    if text:
        pools["ocr"].append((rng.choice(OCR_QUESTIONS), text[1]))
    weights = follow_up_weights(**(weights or {}))
    chosen = []
    while len(chosen) < k:
        kinds = [t for t, questions in pools.items() if questions and weights[t] > 0]
        if not kinds:
            break
        uniform = len({weights[t] for t in kinds}) == 1
        # rng.choice when the kinds weigh the same: the draws (and so the training data) of earlier runs
        kind = rng.choice(kinds) if uniform else rng.choices(kinds, [weights[t] for t in kinds])[0]
        pool = pools[kind]
        chosen.append(pool.pop(rng.randrange(len(pool))))
    return chosen


def make_training_sample(index: int, question_type: str | None = None, follow_ups: int = 0,
                         follow_up_weights: dict | None = None, notes_share: float = 0.0) -> dict:
    """Training sample `index`: make_sample's keys plus "turns", the (question, answer) conversation.

    The first turn is the benchmark question; `follow_ups` more are drawn by `scene_questions`
    (with `follow_up_weights`). With probability `notes_share` the first question comes after a block
    of irrelevant notes, as the hard splits ask it (`_lengthen`).
    """
    qtype, scene, question, answer, image, rng = _draw("train", index, question_type)
    more = scene_questions(scene, rng, follow_ups + 1, follow_up_weights)
    more = [t for t in more if t[0] != question][:follow_ups]
    if notes_share and rng.random() < notes_share:
        question = _lengthen(question, rng)
    turns = [(question, answer)] + more
    return {"question_id": f"train-{index:06d}", "image": image, "question": question, "answers": [answer],
            "question_type": qtype, "turns": turns}


def features():
    import datasets

    return datasets.Features({
        "question_id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "question_type": datasets.Value("string"),
    })


def build_split(split: str, n: int | None = None, start: int = 0):
    """Rows [start, start + n) of `split` as a `datasets.Dataset`, ending at the split's end (SPLIT_SIZES[split])."""
    import datasets

    n = SPLIT_SIZES[split] - start if n is None else min(n, SPLIT_SIZES[split] - start)
    rows = [make_sample(split, i) for i in range(start, start + n)]
    return datasets.Dataset.from_list(rows, features=features())


def build_dataset(sizes: dict | None = None):
    """The train, validation and test splits as a `datasets.DatasetDict` (the hard splits are built on their own)."""
    import datasets

    sizes = {**SPLIT_SIZES, **(sizes or {})}
    return datasets.DatasetDict({split: build_split(split, sizes[split]) for split in SPLITS
                                 if split not in HARD_SPLITS})


def text_corpus(n_per_type: int = 400) -> list[str]:
    """Every kind of text the benchmark produces (questions, answers, fixed phrases), for the tokenizer."""
    lines = [SHORT_ANSWER, " ".join(WORDS), " ".join(COLORS), " ".join(SHAPES), " ".join(SIZES),
             " ".join(str(i) for i in range(100)), "left right above below", "row column"]
    for qtype in TRAINING_TYPES:
        for i in range(n_per_type):
            rng = random.Random(f"corpus/{qtype}/{i}")
            _, question, answer = _BUILDERS[qtype](rng)
            lines += [question, answer, " " + answer, question + SHORT_ANSWER]
    return lines


# --------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower-case, trim, drop surrounding punctuation and quotes, collapse spaces."""
    text = str(text).strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,!?;:'\"`")


def exact_match(prediction: str, answers) -> float:
    """1.0 when the normalised prediction equals one normalised reference, else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def accuracy(predictions, answers, question_types) -> dict:
    """{"overall": mean exact match, "per_type": {type: mean}, "n": count, "n_per_type": {...}}."""
    predictions, answers, question_types = list(predictions), list(answers), list(question_types)
    if not (len(predictions) == len(answers) == len(question_types)):
        raise ValueError("predictions, answers and question_types must have the same length")
    scores: dict[str, list[float]] = {}
    for p, a, t in zip(predictions, answers, question_types):
        scores.setdefault(t, []).append(exact_match(p, a))
    total = [s for v in scores.values() for s in v]
    return {
        "overall": sum(total) / len(total) if total else math.nan,
        "per_type": {t: sum(v) / len(v) for t, v in sorted(scores.items())},
        "n": len(total),
        "n_per_type": {t: len(v) for t, v in sorted(scores.items())},
    }
