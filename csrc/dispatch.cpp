#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace ternlm {

std::vector<std::string> cpu_features() {
    std::vector<std::string> found;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) found.push_back("sse4.2");
    if (__builtin_cpu_supports("avx")) found.push_back("avx");
    if (__builtin_cpu_supports("avx2")) found.push_back("avx2");
    if (__builtin_cpu_supports("fma")) found.push_back("fma");
    if (__builtin_cpu_supports("avx512f")) found.push_back("avx512f");
    if (__builtin_cpu_supports("avx512bw")) found.push_back("avx512bw");
    if (__builtin_cpu_supports("avx512vnni")) found.push_back("avx512vnni");
#elif defined(__aarch64__)
    found.push_back("neon");
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) found.push_back("dotprod");
#endif
#endif
    return found;
}

static const std::vector<KernelSet>& all_kernels() {
    static const std::vector<KernelSet> kernels = {{"scalar", ternary_gemm_ref}};
    return kernels;
}

std::vector<std::string> available_kernel_names() {
    std::vector<std::string> names;
    for (const KernelSet& k : all_kernels()) names.push_back(k.name);
    return names;
}

static const KernelSet& choose_kernels() {
    const std::vector<KernelSet>& kernels = all_kernels();
    const char* forced = std::getenv("TERNLM_KERNELS");
    if (forced && *forced) {
        for (const KernelSet& k : kernels)
            if (k.name == forced) return k;
        std::string names;
        for (const KernelSet& k : kernels) names += (names.empty() ? "" : ", ") + k.name;
        throw std::runtime_error(std::string("TERNLM_KERNELS=") + forced +
                                 " is not available on this CPU/build; available: " + names);
    }
    return kernels.back();  // the list is ordered from most portable to fastest
}

const KernelSet& active_kernels() {
    static const KernelSet& chosen = choose_kernels();
    return chosen;
}

}  // namespace ternlm
