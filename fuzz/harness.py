"""One atheris (libFuzzer) process fuzzing one target:

    python -m fuzz.harness TARGET [CORPUS_DIR ...] [-libfuzzer_flag=value ...]

ternlm, gguf and jinja2 are instrumented for coverage. A failing input ends the process with a
traceback, and libFuzzer writes it to -artifact_prefix. The model files are written inside
$FUZZ_WORKSPACE (default: the system's temporary directory); libFuzzer ends the process without
Python's clean-up, so whoever sets it removes it. fuzz/run.py runs this for every target.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["ternlm", "gguf", "jinja2", "fuzz"]):
    from fuzz import targets


def main() -> None:
    target, libfuzzer_args = sys.argv[1], sys.argv[2:]
    if target not in targets.TARGETS:
        sys.exit(f"unknown target {target!r}; choose one of {', '.join(targets.TARGETS)}")
    workspace = targets.Workspace(os.environ.get("FUZZ_WORKSPACE"))
    atheris.Setup([sys.argv[0], *libfuzzer_args], lambda data: targets.run(target, data, workspace))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
