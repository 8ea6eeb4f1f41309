"""The named prompt formats and reference builders tasks refer to, each as lmms-eval 0.7.3's task utils.

A format takes (task, row, prompt kwargs) and returns the user text; the visuals go before it, except
where lmms-eval builds interleaved messages (`CONTENTS`, MMMU for chat-template models).
Scorers and aggregations are in `evaluation/tasks/scoring.py`.
"""

from __future__ import annotations

import ast
import re

# --------------------------------------------------------------------------- prompt formats


def option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def options_list(task, row) -> list[str]:
    value = row.get(task.options) if task.options else None
    if value is None:
        return []
    if isinstance(value, str):  # MMMU stores the options as a Python literal
        value = ast.literal_eval(value)
    return [str(v) for v in value]


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{letter}. {opt}" for letter, opt in zip(option_letters(len(options)), options))


def fmt_question(task, row, kw):
    return f"{kw['pre_prompt']}{row[task.question]}{kw['post_prompt']}"


def fmt_question_capitalized(task, row, kw):
    return f"{kw['pre_prompt']}{row[task.question].capitalize()}{kw['post_prompt']}"


def fmt_question_stripped(task, row, kw):
    return f"{kw['pre_prompt']}{row[task.question].strip()}{kw['post_prompt']}"


MME_SUFFIX = " Please answer yes or no."


def fmt_mme(task, row, kw):
    """The question, whose own " Please answer yes or no." gives way to a non-empty pre/post prompt."""
    question = row[task.question].strip()
    if kw.get("pre_prompt"):
        question = kw["pre_prompt"] + question.replace(MME_SUFFIX, "")
    if kw.get("post_prompt"):
        question = question.replace(MME_SUFFIX, "") + kw["post_prompt"]
    return question


REALWORLDQA_SUFFIX = "Please answer directly with only the letter of the correct option and nothing else."


def fmt_realworldqa(task, row, kw):
    """The question (stripped), whose own letter instruction gives way to a non-empty post prompt."""
    question = row[task.question].strip()
    if kw.get("post_prompt"):
        question = question.replace(REALWORLDQA_SUFFIX, "")
    return f"{kw.get('pre_prompt', '')}{question}{kw.get('post_prompt', '')}"


def fmt_mcq(task, row, kw):
    return f"{kw['pre_prompt']}{row[task.question]}\n{_lettered(options_list(task, row))}{kw['post_prompt']}"


def fmt_scienceqa(task, row, kw):
    hint = row.get(task.hint)
    context = f"Context: {hint}\n" if hint else hint  # sic: lmms-eval writes a None hint as "None"
    return f"{kw['pre_prompt']}{context}{row[task.question]}\n{_lettered(options_list(task, row))}{kw['post_prompt']}"


def mmmu_text(task, row, kw) -> str:
    """MMMU's construct_prompt: question, lettered options (multiple choice), a blank line, the instruction."""
    question = row[task.question]
    if row.get("question_type") == "multiple-choice":
        return f"{question}\n{_lettered(options_list(task, row))}\n\n{kw['multiple_choice_prompt']}"
    return f"{question}\n\n{kw['open_ended_prompt']}"


def fmt_mmmu(task, row, kw):
    return mmmu_text(task, row, kw)


def fmt_mmmu_interleaved(task, row, kw):
    """What lmms-eval's MMMU doc_to_text gives once doc_to_messages has switched it to the interleaved format."""
    return re.sub(r"<image [1-7]>", "<image>", mmmu_text(task, row, kw))


VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


def fmt_videomme(task, row, kw):
    """Instruction, question, the options (already "A. ..."), then the post prompt on a line of its own
    (lmms-eval joins with a newline and the default post prompt starts with one; the pre prompt is unused)."""
    options = "\n".join(options_list(task, row))
    return f"{VIDEOMME_INSTRUCTION}\n{row[task.question]}\n{options}\n{kw['post_prompt']}"


FORMATS = {
    "question": fmt_question, "question_capitalized": fmt_question_capitalized,
    "question_stripped": fmt_question_stripped, "mme": fmt_mme, "realworldqa": fmt_realworldqa, "mcq": fmt_mcq,
    "scienceqa": fmt_scienceqa, "mmmu": fmt_mmmu, "mmmu_interleaved": fmt_mmmu_interleaved, "videomme": fmt_videomme,
}

# --------------------------------------------------------------------------- interleaved messages (chat models)


def mmmu_image_fields(task, row) -> list[str]:
    """MMMU's visuals: the image_<n> fields its prompt (question and options) mentions, sorted by name."""
    text = mmmu_text(task, row, {"multiple_choice_prompt": "", "open_ended_prompt": ""})
    return sorted({token.strip("<>").replace(" ", "_") for token in re.findall(r"<image \d+>", text)})


def mmmu_content(task, row, kw) -> list[dict]:
    """lmms-eval's MMMU doc_to_messages: the i-th "<image>" place gets the i-th visual, text pieces
    stripped and empty ones dropped; the text after the last place always closes the turn."""
    pieces = fmt_mmmu_interleaved(task, row, kw).split("<image>")
    content = []
    for i in range(len(mmmu_image_fields(task, row))):
        if i < len(pieces) - 1 and pieces[i].strip():
            content.append({"type": "text", "text": pieces[i].strip()})
        content.append({"type": "image", "index": i})
    content.append({"type": "text", "text": pieces[-1].strip()})
    return content


CONTENTS = {"mmmu": (fmt_mmmu_interleaved, mmmu_content)}

# --------------------------------------------------------------------------- references (as lmms-eval's doc_to_target)


def _present(task, row):
    value = row.get(task.answer)
    if value is None:
        raise ValueError(f"the {task.answer!r} field is missing")
    return value


def target_field(task, row):
    return [str(_present(task, row))]


def target_list(task, row):
    value = _present(task, row)
    return [value] if isinstance(value, str) else [str(v) for v in value]


def target_index_letter(task, row):
    value = _present(task, row)
    if str(value).strip() == "":
        raise ValueError("the answer index is empty")
    index, n = int(value), len(options_list(task, row))
    if not 0 <= index < n:
        raise ValueError(f"answer index {index} is outside the {n} options")
    return [option_letters(n)[index]]


def target_yes_no(task, row):
    value = str(_present(task, row))
    if value.lower().strip().replace(".", "") not in ("yes", "no"):
        raise ValueError(f"an MME answer is yes or no, not {value!r}")
    return [value]


TARGETS = {"field": target_field, "list": target_list, "index_letter": target_index_letter, "yes_no": target_yes_no}
# doc_to_visual functions of --include_path YAMLs, by the key a Task's `image` names: function(row) -> images
VISUALS: dict = {}


def text_sample(task, row, family: str, doc_id: int = 0) -> dict:
    """A row's prompt (and interleaved content), references and metadata: everything of a sample but pixels.

    Raises ValueError/KeyError/TypeError on a row that cannot be used.
    """
    kw = task.prompt_kwargs(family)
    content = None
    if task.messages and task.lmms_model(family).chat:
        text_fn, content_fn = CONTENTS[task.messages]
        prompt, content = text_fn(task, row, kw), content_fn(task, row, kw)
    else:
        prompt = FORMATS[task.fmt](task, row, kw)
    return {
        "doc_id": doc_id,
        "id": str(row.get(task.id_field, doc_id)) if task.id_field else str(doc_id),
        "prompt": prompt,
        "content": content,
        "answers": TARGETS[task.target](task, row),
        "options": options_list(task, row) if task.options else None,
        "meta": {k: row.get(k) for k in task.meta_fields},
    }
