"""The README as a user reads it: its Python blocks run as pasted, its links stay in the repository.

The Python blocks run in order as one script from the repository root (a later block may use what an
earlier one made, as a reader pasting them in turn would). A block that needs a GPU or the Hub is marked
by the line `<!-- readme-test: skip (REASON) -->` just before it and is not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \(.+\) -->\s*$")


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """(code, skipped) of every ```python block, in order."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((match.group(1), bool(SKIP.search(before))))
    return blocks


def test_block_extraction_honours_the_skip_mark():
    text = "intro\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [("a = 1\n", False), ("b = 2\n", True)]


def test_the_readme_python_blocks_run_as_pasted():
    blocks = python_blocks(README.read_text())
    assert blocks and "import vlmcompress" in blocks[0][0] and not blocks[0][1]  # the "Use" example runs
    script = "\n".join(code for code, skipped in blocks if not skipped)
    done = subprocess.run([sys.executable, "-"], input=script, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    # the trained reference model answers the SynthVQA question it is shown
    answer, expected = re.search(r"-> (.*) \| expected: (.*)", done.stdout).groups()
    assert answer == expected


def test_the_readme_links_stay_in_the_repository_and_exist():
    text = README.read_text()
    targets = [t for t in re.findall(r"\]\(([^)#]+)", text) + re.findall(r"`(\.\./[^`]+)`", text)
               if "://" not in t]
    assert "docs/design.md" in targets
    for target in targets:
        assert (ROOT / target).resolve().is_relative_to(ROOT), target
        assert (ROOT / target).exists(), target
