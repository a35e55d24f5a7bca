#!/usr/bin/env bash
# The C++ core under AddressSanitizer + UndefinedBehaviorSanitizer, where any report is a failure:
#
#   scripts/sanitize.sh                  # the kernel check, then the tests that drive the core
#   scripts/sanitize.sh tests/test_server.py -k stream    # other pytest arguments instead
#
# ternlm is built with -DTERNLM_SANITIZE=ON into a venv of its own under build/sanitize, which also
# sees the packages of the Python running this script (so nothing else is installed twice), and
# the tests run there with libasan preloaded (Python itself is not instrumented). Leak detection is
# off: the interpreter keeps its allocations until exit by design. A report goes to stderr and
# aborts the run: add -s to the pytest arguments to see it (pytest holds the output of a test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=build/sanitize
# what CI runs: the kernels, the forward pass against transformers, the sampler, the paged KV cache and
# prefix reuse, loading good and hostile files (the atheris runs and the HTTP server are left to plain
# pytest: under ASan they take minutes)
TESTS=(tests/test_kernels.py tests/test_model.py tests/test_sampling.py tests/test_prompt_cache.py tests/test_loading.py
       tests/test_hostile_files.py tests/test_fuzz.py -k "not short_fuzz_run and not server")

[ -x "$OUT/venv/bin/python" ] || "$PYTHON" -m venv "$OUT/venv"
# the calling Python's packages, after the venv's own (a path added by a .pth file has its own .pth
# files ignored, so an editable ternlm there does not shadow the sanitized one)
"$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  > "$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer.pth"
"$OUT/venv/bin/python" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
command -v cmake >/dev/null || "$OUT/venv/bin/python" -m pip install -q "cmake>=3.18"
CMAKE_BUILD_PARALLEL_LEVEL=2 "$OUT/venv/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall \
  -C cmake.define.TERNLM_SANITIZE=ON -C cmake.build-type=RelWithDebInfo -C build-dir="$OUT/build" .

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
echo "== kernel_check (every kernel variant against the scalar reference)"
"$OUT/build/kernel_check"

echo "== pytest with the sanitized core"
if [ $# -eq 0 ]; then set -- "${TESTS[@]}"; fi
# libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it present when ASan starts
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  "$OUT/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
