"""How a sample becomes a request: lmms-eval's --system_instruction (text or a system turn), the prompt identity the
response cache keys by, the batch size (--batch_size N, auto, auto:N) and --write_out's print of a task's first one."""

from __future__ import annotations

import torch

from .data import SampleError, TaskData
from .flags import DEFAULT_MAX_BATCH_SIZE


def with_system_instruction(sample: dict, instruction: str | None, as_system_turn: bool) -> dict:
    """The sample under --system_instruction: lmms-eval's fewshot_context puts it right before the prompt text, or,
    with --apply_chat_template, in a system turn of the chat template."""
    if instruction is None:
        return sample
    if as_system_turn:
        return dict(sample, system=instruction)
    content = sample.get("content")
    if content:
        first = next(i for i, part in enumerate(content) if part["type"] == "text")
        content = [dict(part, text=instruction + part["text"]) if i == first else part for i, part in enumerate(content)]
    return dict(sample, prompt=instruction + sample["prompt"], content=content)


def prompt_identity(sample: dict) -> str:
    """What the cache keys a sample's prompt by: its text, and its system turn when it has one."""
    return sample["prompt"] if sample.get("system") is None else f"{sample['system']}\x00{sample['prompt']}"


class BatchSizer:
    """--batch_size N, or lmms-eval's `auto`: start at `max_batch_size` and halve on running out of memory, keeping
    the largest size that fits; `auto:N` starts that search again N times over a task's samples."""

    def __init__(self, spec: int | str, max_batch_size: int | None, n_samples: int):
        self.auto = isinstance(spec, str)
        self.start = (max_batch_size or DEFAULT_MAX_BATCH_SIZE) if self.auto else spec
        searches = int(spec.split(":")[1]) if self.auto and ":" in spec else 1
        self.search_every = -(-n_samples // searches) if self.auto and searches > 1 else None
        self.size = self.start
        self.sizes = [self.start]  # the size of each search, as found (lmms-eval reports batch_sizes)

    def search_starts(self, index: int) -> bool:
        """Whether a new search begins at the sample in this position (every `search_every` samples)."""
        return bool(self.search_every and index and index % self.search_every == 0)

    def restart(self) -> None:
        self.size = self.start
        self.sizes.append(self.start)

    def halve(self) -> bool:
        """After running out of memory: a smaller size to retry with (False when already 1 or not auto)."""
        if not self.auto or self.size == 1:
            return False
        self.size = max(1, self.size // 2)
        self.sizes[-1] = self.size
        return True


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def write_out(data: TaskData, settings, family: str) -> None:
    """--write_out: the first sample's prompt and target of a task, printed as lmms-eval's print_writeout does."""
    try:
        sample = with_system_instruction(data.sample(0, family), settings.system_instruction,
                                         settings.apply_chat_template)
    except SampleError as exc:
        print(f"Task: {data.task.name}; document 0 cannot be shown: {exc}")
        return
    system = f"system turn: {sample['system']}\n" if sample.get("system") else ""
    print(f"Task: {data.task.name}; document 0; context prompt (starting on next line):\n{system}{sample['prompt']}\n"
          f"(end of prompt on previous line)\ntarget string or answer choice index (starting on next line):\n"
          f"{sample['answers']}\n(end of target on previous line)")
