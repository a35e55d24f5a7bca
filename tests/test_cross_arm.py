"""The C++ kernel check (csrc/tests/kernel_check.cpp) built natively and cross-compiled for ARM64.

Under qemu-user the ARM build runs twice: on an emulated CPU with the dot-product extension (the
`dotprod` variant is chosen) and on a Cortex-A53 without it (only `neon`). Every variant must give
the scalar reference's integers exactly.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # C++ builds, ARM64 under qemu

CSRC = Path(__file__).resolve().parent.parent / "csrc"
COMMON = ["tests/kernel_check.cpp", "kernels_ref.cpp", "dispatch.cpp", "ggml_blocks.cpp", "kv_cache.cpp", "model.cpp",
          "threads.cpp"]
X86_VARIANTS = {"kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"], "kernels_avxvnni.cpp": ["-mavx2", "-mavxvnni"],
                "kernels_avx512vnni.cpp": ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                "kernels_avx512_attention.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"],
                "kernels_amx.cpp": ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile",
                                    "-mamx-int8"]}
ARM_VARIANTS = {"kernels_arm.cpp": [], "kernels_arm_dotprod.cpp": ["-march=armv8.2-a+dotprod"]}


def build(compiler: str, variants: dict[str, list[str]], output: Path, extra: list[str]) -> None:
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", *extra]
    objects = []
    for source, isa_flags in variants.items():
        obj = output.with_name(source.replace(".cpp", ".o"))
        subprocess.run([compiler, *flags, *isa_flags, "-c", source, "-o", str(obj)], cwd=CSRC, check=True)
        objects.append(str(obj))
    subprocess.run([compiler, *flags, *COMMON, *objects, "-pthread", "-o", str(output)], cwd=CSRC, check=True)


def test_native_kernel_check(tmp_path):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the native check here builds the x86 variants")
    binary = tmp_path / "kernel_check"
    build(shutil.which("g++") or "c++", X86_VARIANTS, binary, [])
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failures" in result.stdout


@pytest.mark.parametrize("cpu,variants", [("max", {"scalar", "neon", "dotprod"}), ("cortex-a53", {"scalar", "neon"})])
def test_arm64_kernels_under_qemu(tmp_path, cpu, variants):
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (compiler and qemu):
        pytest.skip("needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
    binary = tmp_path / "kernel_check_arm64"
    build(compiler, ARM_VARIANTS, binary, ["-static"])
    result = subprocess.run([qemu, "-cpu", cpu, str(binary)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {line.split(":")[0] for line in result.stdout.splitlines() if line.endswith(": checked")} == variants
    assert " 0 failures" in result.stdout
