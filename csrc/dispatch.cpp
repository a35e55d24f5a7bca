#include "dispatch.h"

#if defined(__x86_64__)
#include "kernels_x86.h"
#elif defined(__aarch64__)
#include "kernels_arm.h"
#endif

#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace ternlm {

namespace {

#if defined(__x86_64__)
bool has_avx512vnni() {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
}

// Linux hands out the AMX tile registers' 8 KB of state only to a process that asks for it
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it, the first tile instruction
// kills the process. Returns why the AMX kernels cannot run ("" when they can), asking once.
const std::string& amx_refusal() {
    static const std::string why = []() -> std::string {
        if (!has_avx512vnni() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8"))
            return "the CPU has no AMX-INT8";
#if defined(__linux__)
        constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
        constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
        if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0)
            return std::string("the OS refused the tile state (arch_prctl: ") + std::strerror(errno) + ")";
        return "";
#else
        return "AMX is only enabled on Linux";
#endif
    }();
    return why;
}
#elif defined(__aarch64__)
bool has_dotprod() {
#if defined(__linux__)
    return getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#elif defined(__APPLE__)
    int value = 0;
    size_t size = sizeof(value);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value;
#else
    return false;
#endif
}
#endif

}  // namespace

std::vector<std::string> cpu_features() {
    std::vector<std::string> found;
#if defined(__x86_64__)
    __builtin_cpu_init();
#define TERNLM_FEATURE(name) \
    if (__builtin_cpu_supports(name)) found.push_back(name);
    TERNLM_FEATURE("sse4.2") TERNLM_FEATURE("avx") TERNLM_FEATURE("avx2") TERNLM_FEATURE("fma")
    TERNLM_FEATURE("f16c") TERNLM_FEATURE("avxvnni") TERNLM_FEATURE("avx512f") TERNLM_FEATURE("avx512bw")
    TERNLM_FEATURE("avx512vl") TERNLM_FEATURE("avx512vnni") TERNLM_FEATURE("avx512bf16") TERNLM_FEATURE("amx-int8")
#undef TERNLM_FEATURE
#elif defined(__aarch64__)
    found.push_back("neon");
    if (has_dotprod()) found.push_back("dotprod");
#endif
    return found;
}

// The variants this CPU can run, from most portable to fastest.
static const std::vector<KernelSet>& all_kernels() {
    static const std::vector<KernelSet> kernels = [] {
        std::vector<KernelSet> k = {{"scalar", "scalar loops", quantize_row_int8, ternary_gemm_ref, trit_gemm_ref, trits_to_two_bit_ref, dense_gemm_ref, int8_gemm_ref, q4_gemm_ref, f16_store_ref, f16_attention_ref, temper_ref}};
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) k.push_back({"avx2", "1 token: 4 rows at a time; several: 1 row x 4 tokens; 256-bit vpmaddubsw", quantize_row_avx2, ternary_gemm_avx2, trit_gemm_avx2, trits_to_two_bit_avx2, dense_gemm_avx2, int8_gemm_avx2, q4_gemm_avx2, f16_store_avx2, f16_attention_avx2, temper_avx2});
        if (__builtin_cpu_supports("avxvnni")) k.push_back({"avxvnni", "1 token: 4 rows at a time; several: 1 row x 8 tokens; 256-bit vpdpbusd", quantize_row_avx2, ternary_gemm_avxvnni, trit_gemm_avxvnni, trits_to_two_bit_avx2, dense_gemm_avx2, int8_gemm_avx2, q4_gemm_avx2, f16_store_avx2, f16_attention_avx2, temper_avx2});
        if (has_avx512vnni()) k.push_back({"avx512", "1 token: 4 rows at a time, 256-bit vpdpbusd; several: 8 rows x 8 tokens, 512-bit vpdpbusd "
                                                "(rows unpacked once from 32 tokens on)", quantize_row_avx2, ternary_gemm_avx512vnni, trit_gemm_avx512vnni, trits_to_two_bit_avx2, dense_gemm_avx2, int8_gemm_avx512vnni, q4_gemm_avx512vnni, f16_store_avx2, f16_attention_avx512, temper_avx512});
        if (amx_refusal().empty()) k.push_back({"amx", "1 token: 4 rows at a time, 256-bit vpdpbusd; 2-3 tokens: 8 rows x 8 tokens, 512-bit "
                                                "vpdpbusd; 4 and more: AMX tdpbusd, tiles of 16 rows x 16 tokens",
                                                quantize_row_avx2, ternary_gemm_amx, trit_gemm_amx, trits_to_two_bit_avx2, dense_gemm_avx2, int8_gemm_amx, q4_gemm_avx512vnni, f16_store_avx2, f16_attention_avx512, temper_avx512, true});
#elif defined(__aarch64__)
        k.push_back({"neon", "1 row x 4 tokens; NEON multiply-adds", quantize_row_int8, ternary_gemm_neon, trit_gemm_neon, trits_to_two_bit_neon, dense_gemm_ref, int8_gemm_neon, q4_gemm_ref, f16_store_ref, f16_attention_ref, temper_ref});
        if (has_dotprod()) k.push_back({"dotprod", "1 row x 4 tokens; sdot", quantize_row_int8, ternary_gemm_dotprod, trit_gemm_dotprod, trits_to_two_bit_neon, dense_gemm_ref, int8_gemm_dotprod, q4_gemm_ref, f16_store_ref, f16_attention_ref, temper_ref});
#endif
        return k;
    }();
    return kernels;
}

std::vector<std::string> available_kernel_names() {
    std::vector<std::string> names;
    for (const KernelSet& k : all_kernels()) names.push_back(k.name);
    return names;
}

const KernelSet& find_kernels(const std::string& name) {
    std::string names;
    for (const KernelSet& k : all_kernels()) {
        if (k.name == name) return k;
        names += (names.empty() ? "" : ", ") + k.name;
    }
    throw std::invalid_argument("kernel variant '" + name + "' is not available on this CPU/build; available: " + names);
}

static const KernelSet& choose_kernels() {
    const char* forced = std::getenv("TERNLM_KERNELS");
    if (forced && *forced) return find_kernels(forced);
    return all_kernels().back();
}

std::string unavailable_kernels_note() {
#if defined(__x86_64__)
    if (has_avx512vnni() && __builtin_cpu_supports("amx-int8") && !amx_refusal().empty()) return "amx: " + amx_refusal();
#endif
    return "";
}

const KernelSet& active_kernels() {
    static const KernelSet& chosen = choose_kernels();
    return chosen;
}

// docs/performance.md, "The 1.6-bit layout": 1.6-bit weights are a fifth fewer bytes to stream,
// but take more instructions a weight. Measured on Zen 4 (AVX-512, 2 cores): one stream decodes at
// 1.10-1.14x the 2-bit speed on both cores but 0.97-0.99x on one (bound by the digits' decoding there),
// batches of 2-8 sequences at 0.67-0.88x (compute-bound: twice the vpdpbusd a weight) and prompts at
// 0.97x; with the AVX2 kernels one stream decodes at 0.67x. On a Xeon with AMX: one stream 1.09-1.12x
// on 1 and 2 cores, but 8 streams of a server 0.81x (the tile unit takes twice the products a weight).
// So 2 bits is the default everywhere (a server's batches lose more than one stream gains), and 1.6
// the choice for one stream or when memory is short.
TernaryLayout faster_ternary_layout() { return TernaryLayout::TwoBit; }

std::string ternary_layout_rule() {
    return "2 on every CPU measured: 1.6 decodes one stream faster (1.10-1.14x on 2 Zen 4 cores, 0.97-0.99x on 1; "
           "1.09-1.12x on an AMX Xeon) but batches run at 0.67-0.88x; 1.6 saves a fifth of the weights' memory";
}

}  // namespace ternlm
