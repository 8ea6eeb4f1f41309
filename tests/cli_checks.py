"""What the CLI tests share: the one-line rejection contract (exit 2, before any model loads) and its guards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import run as cli  # noqa: E402


@pytest.fixture(autouse=True)
def in_a_scratch_folder(tmp_path, monkeypatch):
    """Runs without --output_path write to ./results: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_model(monkeypatch):
    """A runner factory, and vlmcompress.load, that fail the test if anything tries to load a model."""
    import vlmcompress

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before the arguments were rejected")

    monkeypatch.setattr(vlmcompress, "load", refuse)
    return refuse


def rejected(args, capsys, runner_factory) -> str:
    """The CLI's one-line error for `args`, asserting exit status 2 and nothing else on stderr but the usage."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args, runner_factory=runner_factory)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: " in err[-1] and "Traceback" not in "\n".join(err)
    return err[-1]
