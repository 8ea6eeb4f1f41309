"""Running a test file's triton kernels in triton's interpreter, on the CPU.

triton.jit reads TRITON_INTERPRET when it decorates, and importing vlmcompress imports triton: the interpreted
tests (marked `interpreted`) run in a child process started with it set, from the file's
`test_triton_kernels_in_a_child_process = in_a_child_process(__file__)`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernels_in_a_child_process")


def in_a_child_process(test_file: str):
    """The test that runs `test_file`'s interpreted tests in a child process and asserts they all passed."""
    triton = pytest.importorskip("triton")

    @pytest.mark.skipif(INTERPRETED, reason="this is the parent")
    @pytest.mark.skipif(tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8),
                        reason="triton's interpreter loops over runtime bounds since 3.8")
    def test_triton_kernels_in_a_child_process():
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"],
            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(test_file).parent, capture_output=True,
            text=True, timeout=600)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
        assert " passed" in child.stdout and "skipped" not in child.stdout.splitlines()[-1], child.stdout[-2000:]

    return test_triton_kernels_in_a_child_process
