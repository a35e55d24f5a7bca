// Which kernel variant runs, chosen once from the CPU's features (TERNLM_KERNELS overrides).
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace ternlm {

struct KernelSet {
    std::string name;
    std::string ternary_paths;  // how the ternary GEMM takes one token and several (ternlm info)
    QuantizeRowFn quantize_row;
    TernaryGemmFn ternary_gemm;
    TritGemmFn trit_gemm;            // the 1.6-bit layout, for one token and a few
    TritsToTwoBitFn trits_to_two_bit;
    DenseGemmFn dense_gemm;
    Int8GemmFn int8_gemm;
    Q4GemmFn q4_gemm;
    F16StoreFn f16_store;
    F16AttentionFn f16_attention;
    TemperFn temper;
    // The GEMMs take any number of tokens and tile rows and tokens themselves (AMX). Otherwise the
    // model does: prompts unpack 1.6-bit rows to the 2-bit layout for ternary_gemm (multiply_rows),
    // and many tokens meet the head a block of rows and 8 tokens at a time (over_head_blocks).
    bool gemms_tile_themselves = false;
};

const KernelSet& active_kernels();
const KernelSet& find_kernels(const std::string& name);  // throws std::invalid_argument
std::vector<std::string> available_kernel_names();
std::vector<std::string> cpu_features();
// Why a variant this CPU has the instructions for cannot run ("" when none): AMX when the OS refuses it.
std::string unavailable_kernels_note();

// The ternary layout that decodes faster with the active kernels, and the measured rule behind it.
TernaryLayout faster_ternary_layout();
std::string ternary_layout_rule();  // the SIMD features this CPU reports

}  // namespace ternlm
