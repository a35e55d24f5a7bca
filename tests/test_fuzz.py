"""The loaders against hostile files: the fuzz seeds load, every input the fuzzer once broke them
with (tests/data/fuzz/TARGET/) is refused cleanly, and each harness runs a bounded number of
inputs under atheris (fuzz/run.py runs them for minutes; docs/reliability.md has the numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import targets

REGRESSIONS = Path(__file__).resolve().parent / "data" / "fuzz"
QUICK_RUNS = 150


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = targets.Workspace(tmp_path_factory.mktemp("fuzz"))
    yield ws
    ws.close()


@pytest.mark.parametrize("target", targets.TARGETS)
def test_every_seed_loads(workspace, target):
    seeds = targets.seed_files(target)
    assert seeds
    for seed in seeds:
        assert targets.run(target, seed.read_bytes(), workspace) == "loaded", seed


def regression_inputs() -> list[tuple[str, Path]]:
    return sorted((path.parent.name, path) for path in REGRESSIONS.glob("*/*") if path.is_file())


@pytest.mark.parametrize("target, path", regression_inputs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_inputs_that_once_broke_a_loader_are_refused_cleanly(workspace, target, path):
    outcome = targets.run(target, path.read_bytes(), workspace)
    assert outcome == "loaded" or outcome.startswith("refused: ")


def test_the_harness_reports_an_exception_other_than_format_error(workspace, monkeypatch):
    """The check itself can fail: a loader raising KeyError is a bug, not a refusal."""
    def broken(path):
        raise KeyError("tensor")

    monkeypatch.setattr(targets, "exercise", broken)
    with pytest.raises(KeyError):
        targets.run("config", targets.seed_files("config")[0].read_bytes(), workspace)


def test_the_harness_reports_an_allocation_the_input_does_not_justify(workspace, monkeypatch):
    import numpy as np

    monkeypatch.setattr(targets, "exercise", lambda path: np.ones(targets.MEMORY_BASE // 8 + (1 << 20)).sum())
    with pytest.raises(targets.MemoryOverrun):
        targets.run("config", b"{}", workspace)


@pytest.mark.slow
@pytest.mark.parametrize("target", targets.TARGETS)
def test_a_short_fuzz_run_finds_nothing(tmp_path, target):
    pytest.importorskip("atheris", reason="pip install atheris (in the test extra)")
    from fuzz.run import fuzz_target

    result = fuzz_target(target, seconds=None, runs=QUICK_RUNS, out=tmp_path)
    assert not result.crashes, result.output[-4000:]
    assert result.executions >= QUICK_RUNS, result.output[-2000:]
