"""Fuzz every loader entry point for a time budget each, one target at a time:

    python -m fuzz.run                       # every target, 60 s each
    python -m fuzz.run --seconds 300 gguf    # one target, 5 minutes
    python -m fuzz.run --runs 200            # a fixed number of inputs each (what the tests do)

Each target runs in its own process (fuzz/harness.py) with libFuzzer's limits: -timeout per input
(a hang is a bug) and -rss_limit_mb. New coverage-increasing inputs go to build/fuzz/corpus/TARGET
(the committed seeds in fuzz/seeds/TARGET are read, never written); a failing input is written to
build/fuzz/crashes/TARGET/ and the run exits non-zero. Copy such a file to tests/data/fuzz/TARGET/
once it is fixed: tests/test_fuzz.py replays every file there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import SEEDS, TARGETS

ROOT = Path(__file__).resolve().parent.parent
PER_INPUT_TIMEOUT_S = 30
RSS_LIMIT_MB = 3072


@dataclass
class TargetResult:
    target: str
    executions: int
    seconds: float
    crashes: list[Path]
    output: str


def fuzz_target(target: str, seconds: int | None, runs: int | None, out: Path) -> TargetResult:
    corpus, crashes = out / "corpus" / target, out / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    limits = [f"-max_total_time={seconds}"] if seconds else []
    limits += [f"-runs={runs}"] if runs else []
    command = [sys.executable, "-m", "fuzz.harness", target, str(corpus), str(SEEDS / target), *limits,
               f"-timeout={PER_INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
               f"-artifact_prefix={crashes}/"]
    earlier = set(crashes.iterdir())
    workspace = tempfile.mkdtemp(prefix="ternlm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "FUZZ_WORKSPACE": workspace})
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    output = result.stdout + result.stderr
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    found = sorted(set(crashes.iterdir()) - earlier)
    if result.returncode != 0 and not found:
        found = [Path(f"(exit code {result.returncode}, no input written)")]
    return TargetResult(target, int(executed.group(1)) if executed else 0, time.monotonic() - started, found, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"targets to fuzz (default all: {', '.join(TARGETS)})")
    parser.add_argument("--seconds", type=int, default=None, help="time budget per target (default 60 unless --runs)")
    parser.add_argument("--runs", type=int, default=None, help="inputs per target")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz", help="corpus and crash directory")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target {sorted(unknown)[0]!r}; choose from {', '.join(TARGETS)}")
    seconds = args.seconds if args.seconds or args.runs else 60
    results = []
    for target in args.targets or TARGETS:
        result = fuzz_target(target, seconds, args.runs, args.out)
        results.append(result)
        status = "ok" if not result.crashes else f"FAILED: {', '.join(map(str, result.crashes))}"
        print(f"{target}: {result.executions} inputs in {result.seconds:.0f} s, {status}", flush=True)
        if result.crashes:
            print(result.output[-4000:], file=sys.stderr)
    return 1 if any(r.crashes for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
