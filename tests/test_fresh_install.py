"""What a fresh install gets: the transformers version in the range the package declares, and an evaluation that
runs on the package's own dependencies (the plot's library is an extra)."""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import transformers
from evaluation import report

ROOT = Path(__file__).resolve().parent.parent


def declared(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, dependencies) if r.name == name)


def test_the_installed_transformers_is_in_the_declared_range():
    requirement = declared("transformers")
    assert requirement.specifier.contains(transformers.__version__), (transformers.__version__, str(requirement))
    # both ends are bounded: a release pip would pick tomorrow is never one CI has not run
    assert {spec.operator for spec in requirement.specifier} >= {">=", "<"}


def test_without_matplotlib_the_plot_is_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    runs = [{"name": name, "summary": {"accuracy": accuracy, "kv_bytes": kv_bytes, "latency_s": 1.0}}
            for name, accuracy, kv_bytes in (("baseline", 0.9, 100), ("snapkv", 0.8, 10))]
    assert report.pareto_plot(runs, tmp_path / "drawn.png").exists()  # the test environment has the extra
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    with caplog.at_level(logging.WARNING, logger=report.__name__):
        assert report.pareto_plot(runs, tmp_path / "pareto.png") is None
    assert not (tmp_path / "pareto.png").exists()
    assert [r.getMessage() for r in caplog.records] == [
        "pareto.png not drawn: matplotlib is not installed (pip install 'vlmcompress[eval]')"]
