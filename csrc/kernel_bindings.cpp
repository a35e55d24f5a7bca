// The kernels' entry points for the tests (the submodule ternlm._core.kernels): each takes the
// name of a kernel variant ("" for the one in use), so tests/test_kernels.py can run every variant
// the CPU has on the same inputs and compare them with NumPy and with each other.
#include "bindings.h"
#include "sampler.h"

#include <cstring>

namespace ternlm {

void bind_kernel_checks(nb::module_ m) {
    m.def(
        "quantize_activations",
        [](Array<const float, nb::ndim<2>> x, const std::string& kernel) {
            const int64_t T = x.shape(0), K = x.shape(1), padded = padded_cols(K);
            auto xq = owned_array<int8_t>({size_t(T), size_t(padded)});
            auto scales = owned_array<float>({size_t(T)});
            auto sums = owned_array<int32_t>({size_t(T)});
            const QuantizeRowFn quantize = kernels_named(kernel).quantize_row;
            {
                nb::gil_scoped_release release;
                std::memset(xq.data(), 0x55, static_cast<size_t>(T * padded));  // the padding must be written
                for (int64_t t = 0; t < T; ++t)
                    scales.data()[t] = quantize(x.data() + t * K, K, xq.data() + t * padded, sums.data() + t);
            }
            return nb::make_tuple(xq, scales, sums);
        },
        "x"_a, "kernel"_a = "",
        "Per-token absmax int8 quantization: returns (xq int8 [T, padded K], a float32 [T], sum(xq) int32 [T]).");

    nb::class_<TernaryMatrix>(m, "TernaryMatrix")
        .def(
            "__init__",
            [](TernaryMatrix* self, Array<const int8_t, nb::ndim<2>> ternary, float scale, double ternary_bits) {
                new (self) TernaryMatrix(TernaryMatrix::from_ternary(
                    ternary.data(), static_cast<int64_t>(ternary.shape(0)),
                    static_cast<int64_t>(ternary.shape(1)), scale, parse_ternary_bits(ternary_bits)));
            },
            "ternary"_a, "scale"_a = 1.0f, "ternary_bits"_a = 2.0)
        .def_ro("rows", &TernaryMatrix::rows)
        .def_ro("cols", &TernaryMatrix::cols)
        .def_ro("scale", &TernaryMatrix::scale)
        .def_prop_ro("ternary_bits", [](const TernaryMatrix& w) { return ternary_bits_of(w.layout); })
        .def_prop_ro("nbytes", [](const TernaryMatrix& w) { return w.bytes.size(); })
        .def(
            "packed_bytes",
            [](const TernaryMatrix& w) {
                auto out = owned_array<uint8_t>({size_t(w.rows), size_t(w.row_bytes())});
                std::memcpy(out.data(), w.bytes.data(), w.bytes.size());
                return out;
            },
            "The stored bytes [rows, row bytes] in the matrix's runtime layout (csrc/formats.h).")
        .def(
            "unpacked_to_two_bit",
            [](const TernaryMatrix& w, const std::string& kernel) {
                if (w.layout != TernaryLayout::Trits) throw std::invalid_argument("the matrix is already 2-bit");
                const int64_t width = w.activation_cols();
                auto out = owned_array<uint8_t>({size_t(w.rows), size_t(width / 4)});
                kernels_named(kernel).trits_to_two_bit(w.bytes.data(), w.rows * width / kTritRowMultiple, out.data());
                return out;
            },
            "kernel"_a = "", "A 1.6-bit matrix's rows in the 2-bit layout, trit_padded_cols(cols) wide.")
        .def(
            "matmul_int",
            [](const TernaryMatrix& w, Array<const int8_t, nb::ndim<2>> xq, const std::string& kernel) {
                if (static_cast<int64_t>(xq.shape(1)) != w.cols)
                    throw std::invalid_argument("activation width does not match the matrix");
                const KernelSet& kernels = kernels_named(kernel);
                const int64_t T = xq.shape(0), K = w.cols, padded = w.activation_cols();
                auto out = owned_array<int32_t>({size_t(T), size_t(w.rows)});
                {
                    nb::gil_scoped_release release;
                    std::vector<int8_t> padded_x(static_cast<size_t>(T * padded), 0);
                    std::vector<int32_t> sums(static_cast<size_t>(T), 0);
                    for (int64_t t = 0; t < T; ++t)
                        for (int64_t k = 0; k < K; ++k) {
                            padded_x[t * padded + k] = xq.data()[t * K + k];
                            sums[t] += xq.data()[t * K + k];
                        }
                    if (w.layout == TernaryLayout::Trits)
                        kernels.trit_gemm(w.trit_view(), 0, w.rows, padded_x.data(), sums.data(), T, out.data(), w.rows);
                    else
                        kernels.ternary_gemm(w.view(), 0, w.rows, padded_x.data(), sums.data(), T, out.data(), w.rows);
                }
                return out;
            },
            "xq"_a, "kernel"_a = "",
            "Exact integer product xq [T, cols] . W^T -> int32 [T, rows] with the chosen kernel's GEMM for the "
            "matrix's layout.");

    m.def(
        "dense_gemm",
        [](nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> matrix, const std::string& dtype,
           Array<const float, nb::ndim<2>> x, const std::string& kernel) {
            const DenseMatrix dense = dense_view(matrix, dtype);
            if (static_cast<int64_t>(x.shape(1)) != dense.cols)
                throw std::invalid_argument("activation width does not match the matrix");
            const DenseGemmFn gemm = kernels_named(kernel).dense_gemm;
            const int64_t T = x.shape(0);
            auto out = owned_array<float>({size_t(T), size_t(dense.rows)});
            {
                nb::gil_scoped_release release;
                gemm(dense, 0, dense.rows, x.data(), T, out.data(), dense.rows);
            }
            return out;
        },
        "matrix"_a, "dtype"_a, "x"_a, "kernel"_a = "",
        "x [T, cols] . matrix^T -> float32 [T, rows]; matrix in float32/float16/bfloat16 storage.");

    m.def(
        "int8_gemm",
        [](Array<const int8_t, nb::ndim<2>> q, Array<const int8_t, nb::ndim<2>> xq, const std::string& kernel) {
            const int64_t rows = q.shape(0), cols = q.shape(1), T = xq.shape(0), padded = padded_cols(cols);
            if (static_cast<int64_t>(xq.shape(1)) != cols) throw std::invalid_argument("activation width does not match");
            const Int8GemmFn gemm = kernels_named(kernel).int8_gemm;
            auto out = owned_array<int32_t>({size_t(T), size_t(rows)});
            {
                nb::gil_scoped_release release;
                std::vector<int8_t> qp(static_cast<size_t>(rows * padded), 0), xp(static_cast<size_t>(T * padded), 0);
                for (int64_t r = 0; r < rows; ++r) std::memcpy(&qp[r * padded], q.data() + r * cols, cols);
                for (int64_t t = 0; t < T; ++t) std::memcpy(&xp[t * padded], xq.data() + t * cols, cols);
                gemm({qp.data(), rows, cols}, 0, rows, xp.data(), T, out.data(), rows);
            }
            return out;
        },
        "q"_a, "xq"_a, "kernel"_a = "", "Exact int8 product xq [T, cols] . q^T -> int32 [T, rows] (q in [-127, 127]).");

    m.def(
        "q4_head_logits",
        [](Array<const float, nb::ndim<2>> head, Array<const float, nb::ndim<2>> x, const std::string& kernel) {
            // quantizes `head` to q4 and x to int8, then runs the kernel: for tests
            const int64_t rows = head.shape(0), cols = head.shape(1), T = x.shape(0), padded = padded_cols(cols);
            if (static_cast<int64_t>(x.shape(1)) != cols) throw std::invalid_argument("activation width does not match");
            const Q4GemmFn gemm = kernels_named(kernel).q4_gemm;
            auto out = owned_array<float>({size_t(T), size_t(rows)});
            {
                nb::gil_scoped_release release;
                std::vector<uint8_t> q(static_cast<size_t>(rows * padded / 2));
                std::vector<uint16_t> scales(static_cast<size_t>(rows * padded / kQ4Group));
                for (int64_t r = 0; r < rows; ++r)
                    quantize_row_q4(head.data() + r * cols, cols, &q[r * padded / 2], &scales[r * padded / kQ4Group]);
                std::vector<int8_t> xq(static_cast<size_t>(T * padded));
                std::vector<float> a(static_cast<size_t>(T));
                for (int64_t t = 0; t < T; ++t) {
                    int32_t sum;
                    a[t] = quantize_row_int8(x.data() + t * cols, cols, &xq[t * padded], &sum);
                }
                gemm({q.data(), scales.data(), rows, cols}, 0, rows, xq.data(), T, out.data(), rows);
                for (int64_t t = 0; t < T; ++t)
                    for (int64_t r = 0; r < rows; ++r) out.data()[t * rows + r] /= a[t];
            }
            return out;
        },
        "head"_a, "x"_a, "kernel"_a = "", "q4-quantized head [rows, cols] times int8-quantized x [T, cols] (tests).");

    m.def(
        "q4_quantize",
        [](Array<const float, nb::ndim<2>> head) {
            const int64_t rows = head.shape(0), cols = head.shape(1), padded = padded_cols(cols);
            auto q = owned_array<uint8_t>({size_t(rows), size_t(padded / 2)});
            auto scales = owned_array<uint16_t>({size_t(rows), size_t(padded / kQ4Group)});
            {
                nb::gil_scoped_release release;
                for (int64_t r = 0; r < rows; ++r)
                    quantize_row_q4(head.data() + r * cols, cols, q.data() + r * padded / 2,
                                    scales.data() + r * padded / kQ4Group);
            }
            return nb::make_tuple(q, scales);
        },
        "head"_a, "The q4 head format of rows [rows, cols]: (nibbles uint8 [rows, padded / 2], f16 scales uint16 [rows, padded / 32]).");
    m.def(
        "dequantize_rows",
        [](Array<const uint8_t, nb::ndim<2>> blocks, const std::string& type_name, int64_t cols) {
            const BlockType type = block_type_named(type_name);
            if (static_cast<int64_t>(blocks.shape(1)) != block_row_bytes(type, cols))
                throw std::invalid_argument("rows must be " + std::to_string(block_row_bytes(type, cols)) + " bytes");
            const int64_t rows = blocks.shape(0);
            auto out = owned_array<float>({size_t(rows), size_t(cols)});
            for (int64_t r = 0; r < rows; ++r) dequantize_row(type, blocks.data() + r * blocks.shape(1), cols, out.data() + r * cols);
            return out;
        },
        "blocks"_a, "type"_a, "cols"_a, "Rows of ggml blocks (uint8 [rows, bytes per row]) as float32 [rows, cols] (tests).");

    m.def(
        "f16_round",
        [](Array<const float, nb::ndim<1>> x, const std::string& kernel) {
            auto out = owned_array<uint16_t>({size_t(x.shape(0))});
            kernels_named(kernel).f16_store(x.data(), x.shape(0), out.data());
            return out;
        },
        "x"_a, "kernel"_a = "", "float32 -> float16 bit patterns, as the KV cache stores them.");

    m.def(
        "f16_attention",
        [](Array<const float> q, Array<const uint16_t, nb::ndim<2>> keys, Array<const uint16_t, nb::ndim<2>> values,
           int64_t column, float scale, const std::string& kernel, int log2_block) {
            if (q.ndim() != 2 && q.ndim() != 3) throw std::invalid_argument("q must be [heads, head_dim] or [queries, heads, head_dim]");
            const bool one_query = q.ndim() == 2;
            const int64_t queries = one_query ? 1 : q.shape(0), heads = q.shape(q.ndim() - 2), head_dim = q.shape(q.ndim() - 1);
            const int64_t count = keys.shape(0), width = keys.shape(1);
            if (queries == 0 || heads == 0 || head_dim == 0) throw std::invalid_argument("q is empty");
            if (count < queries || values.shape(0) != keys.shape(0) || values.shape(1) != keys.shape(1) || column < 0 ||
                column + head_dim > width)
                throw std::invalid_argument("keys and values must be [count >= queries, width] with the head inside width");
            const F16AttentionFn attention = kernels_named(kernel).f16_attention;
            if (log2_block < 0 || log2_block > 30) throw std::invalid_argument("log2_block must be in [0, 30]");
            auto out = one_query ? owned_array<float>({size_t(heads), size_t(head_dim)})
                                 : owned_array<float>({size_t(queries), size_t(heads), size_t(head_dim)});
            nb::gil_scoped_release release;
            // Blocks of 2^log2_block positions cut from the contiguous arrays, visited through a table.
            std::vector<const uint16_t*> key_blocks, value_blocks;
            for (int64_t j = 0; j < count; j += int64_t{1} << log2_block) {
                key_blocks.push_back(keys.data() + j * width + column);
                value_blocks.push_back(values.data() + j * width + column);
            }
            const QueryRun run{q.data(), out.data(), queries, heads * head_dim, heads, head_dim, count - queries + 1};
            std::vector<float> scratch(static_cast<size_t>(attention_scratch_floats(run)));
            attention(run, {key_blocks.data(), log2_block, width}, {value_blocks.data(), log2_block, width}, scale,
                      scratch.data());
            return out;
        },
        "q"_a, "keys"_a, "values"_a, "column"_a, "scale"_a, "kernel"_a = "", "log2_block"_a = 30,
        "softmax(scale * q k^T) v for the query heads sharing the KV head at columns [column, column + head_dim) "
        "of f16 keys and values [count, width], read in blocks of 2^log2_block positions (tests). q is one "
        "query's heads [heads, head_dim], or the last `queries` positions' [queries, heads, head_dim], query i "
        "attending to the first count - queries + 1 + i positions.");

    m.def(
        "temper",
        [](Array<const float, nb::ndim<1>> logits, float max, float inverse_temperature, const std::string& kernel) {
            const size_t n = logits.shape(0);
            auto distance = owned_array<float>({n});
            auto weight = owned_array<float>({n});
            kernels_named(kernel).temper(logits.data(), static_cast<int64_t>(n), max, inverse_temperature,
                                         distance.data(), weight.data());
            return nb::make_tuple(distance, weight);
        },
        "logits"_a, "max"_a, "inverse_temperature"_a, "kernel"_a = "",
        "The sampler's tempering: (distances (max - logits) * inverse_temperature, weights e^-distance) (tests).");
}

}  // namespace ternlm
