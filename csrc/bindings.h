// What the two binding files share: array types and the conversions between Python's spellings
// and the core's.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "dispatch.h"
#include "ggml_blocks.h"
#include "model.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace ternlm {

template <typename T, typename... Shape>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Shape...>;

inline DType parse_dtype(const std::string& name) {
    if (name == "float32") return DType::F32;
    if (name == "float16") return DType::F16;
    if (name == "bfloat16") return DType::BF16;
    throw std::invalid_argument("unsupported dense dtype " + name);
}

inline DenseMatrix dense_view(nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a,
                              const std::string& dtype) {
    const DType d = parse_dtype(dtype);
    if (static_cast<int64_t>(a.itemsize()) != dtype_bytes(d)) throw std::invalid_argument("array item size does not match " + dtype);
    return {a.data(), d, static_cast<int64_t>(a.shape(0)), static_cast<int64_t>(a.shape(1))};
}

// `ternary_bits` as users spell it: 2 or 1.6.
inline TernaryLayout parse_ternary_bits(double bits) {
    if (bits == 2.0) return TernaryLayout::TwoBit;
    if (bits == 1.6) return TernaryLayout::Trits;
    throw std::invalid_argument("ternary_bits must be 2 or 1.6, got " + std::to_string(bits));
}

inline double ternary_bits_of(TernaryLayout layout) { return layout == TernaryLayout::Trits ? 1.6 : 2.0; }

// A [rows, cols] matrix as stored: `dtype` float32/float16/bfloat16 (a holds the elements) or a ggml
// block type such as Q4_0 (a holds uint8 [rows, bytes per row] of `cols` weights each).
inline StoredMatrix stored_view(nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a,
                                const std::string& dtype, int64_t cols) {
    StoredMatrix m;
    if (dtype.rfind("float", 0) == 0 || dtype == "bfloat16") {
        m.dense = dense_view(a, dtype);
        return m;
    }
    const BlockType type = block_type_named(dtype);
    if (a.dtype() != nb::dtype<uint8_t>() || static_cast<int64_t>(a.shape(1)) != block_row_bytes(type, cols))
        throw std::invalid_argument(dtype + " rows of " + std::to_string(cols) + " weights must be uint8 [rows, " +
                                    std::to_string(block_row_bytes(type, cols)) + "]");
    m.blocks = {static_cast<const uint8_t*>(a.data()), type, static_cast<int64_t>(a.shape(0)), cols};
    return m;
}

// The kernel set a test asks for by name; "" is the one in use.
inline const KernelSet& kernels_named(const std::string& name) {
    return name.empty() ? active_kernels() : find_kernels(name);
}

template <typename T>
nb::ndarray<nb::numpy, T> owned_array(std::vector<size_t> shape) {
    size_t n = 1;
    for (size_t s : shape) n *= s;
    T* data = new T[n]();
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

// The kernels' test entry points (kernel_bindings.cpp), in the submodule _core.kernels.
void bind_kernel_checks(nb::module_ m);

}  // namespace ternlm
