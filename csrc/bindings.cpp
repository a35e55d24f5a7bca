// Python bindings. Every heavy call releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>

#include "dispatch.h"
#include "model.h"
#include "sampler.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace ternlm {

template <typename T, typename... Shape>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Shape...>;

// A model plus the Python objects that own the memory it borrows (memory-mapped embeddings).
struct PyModel {
    std::unique_ptr<Model> model;
    nb::object embedding_owner, head_owner;
};

static DType parse_dtype(const std::string& name) {
    if (name == "float32") return DType::F32;
    if (name == "float16") return DType::F16;
    if (name == "bfloat16") return DType::BF16;
    throw std::invalid_argument("unsupported dense dtype " + name);
}

static DenseMatrix dense_view(nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a,
                              const std::string& dtype) {
    const DType d = parse_dtype(dtype);
    if (static_cast<int64_t>(a.itemsize()) != dtype_bytes(d)) throw std::invalid_argument("array item size does not match " + dtype);
    return {a.data(), d, static_cast<int64_t>(a.shape(0)), static_cast<int64_t>(a.shape(1))};
}

// `ternary_bits` as users spell it: 2 or 1.6.
static TernaryLayout parse_ternary_bits(double bits) {
    if (bits == 2.0) return TernaryLayout::TwoBit;
    if (bits == 1.6) return TernaryLayout::Trits;
    throw std::invalid_argument("ternary_bits must be 2 or 1.6, got " + std::to_string(bits));
}

static double ternary_bits_of(TernaryLayout layout) { return layout == TernaryLayout::Trits ? 1.6 : 2.0; }

// A [rows, cols] matrix as stored: `dtype` float32/float16/bfloat16 (a holds the elements) or a ggml
// block type such as Q4_0 (a holds uint8 [rows, bytes per row] of `cols` weights each).
static StoredMatrix stored_view(nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a,
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
static const KernelSet& kernels_named(const std::string& name) {
    return name.empty() ? active_kernels() : find_kernels(name);
}

template <typename T>
static nb::ndarray<nb::numpy, T> owned_array(std::vector<size_t> shape) {
    size_t n = 1;
    for (size_t s : shape) n *= s;
    T* data = new T[n]();
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

}  // namespace ternlm

NB_MODULE(_core, m) {
    using namespace ternlm;
    m.doc() = "ternlm's C++ core: ternary kernels and the BitNet forward pass";

    m.def("cpu_features", &cpu_features, "SIMD features this CPU reports");
    m.def("kernel_name", [] { return active_kernels().name; }, "the kernel variant in use");
    m.def("ternary_gemm_paths", [] { return active_kernels().ternary_paths; },
          "how the variant in use multiplies ternary weights by one token and by several");
    m.def("default_ternary_bits", [] { return ternary_bits_of(faster_ternary_layout()); },
          "the bits per ternary weight (2 or 1.6) that decode faster with the kernels in use");
    m.def("ternary_bits_rule", &ternary_layout_rule, "how default_ternary_bits chooses");
    m.def("available_kernels", &available_kernel_names, "kernel variants this build and CPU can run");
    m.def("default_threads", &default_thread_count);
    m.def("measure_read_bandwidth", &measure_read_bandwidth, "bytes"_a, "threads"_a, "repeats"_a = 5,
          nb::call_guard<nb::gil_scoped_release>(), "Best GB/s reading `bytes` of memory with `threads` threads.");

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
        "dense_gemv",
        [](nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> matrix, const std::string& dtype,
           Array<const float, nb::ndim<2>> x, const std::string& kernel) {
            const DenseMatrix dense = dense_view(matrix, dtype);
            if (static_cast<int64_t>(x.shape(1)) != dense.cols)
                throw std::invalid_argument("activation width does not match the matrix");
            const DenseGemvFn gemv = kernels_named(kernel).dense_gemv;
            const int64_t T = x.shape(0);
            auto out = owned_array<float>({size_t(T), size_t(dense.rows)});
            {
                nb::gil_scoped_release release;
                gemv(dense, 0, dense.rows, x.data(), T, out.data(), dense.rows);
            }
            return out;
        },
        "matrix"_a, "dtype"_a, "x"_a, "kernel"_a = "",
        "x [T, cols] . matrix^T -> float32 [T, rows]; matrix in float32/float16/bfloat16 storage.");

    m.def(
        "int8_gemv",
        [](Array<const int8_t, nb::ndim<2>> q, Array<const int8_t, nb::ndim<2>> xq, const std::string& kernel) {
            const int64_t rows = q.shape(0), cols = q.shape(1), T = xq.shape(0), padded = padded_cols(cols);
            if (static_cast<int64_t>(xq.shape(1)) != cols) throw std::invalid_argument("activation width does not match");
            const Int8GemvFn gemv = kernels_named(kernel).int8_gemv;
            auto out = owned_array<int32_t>({size_t(T), size_t(rows)});
            {
                nb::gil_scoped_release release;
                std::vector<int8_t> qp(static_cast<size_t>(rows * padded), 0), xp(static_cast<size_t>(T * padded), 0);
                for (int64_t r = 0; r < rows; ++r) std::memcpy(&qp[r * padded], q.data() + r * cols, cols);
                for (int64_t t = 0; t < T; ++t) std::memcpy(&xp[t * padded], xq.data() + t * cols, cols);
                gemv({qp.data(), rows, cols}, 0, rows, xp.data(), T, out.data(), rows);
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
            const Q4GemvFn gemv = kernels_named(kernel).q4_gemv;
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
                gemv({q.data(), scales.data(), rows, cols}, 0, rows, xq.data(), T, out.data(), rows);
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

    m.attr("KV_BLOCK") = kKVBlock;
    nb::class_<KVBlockPool>(m, "KVBlockPool")
        .def(nb::init<const ModelShape&, int64_t, bool>(), "shape"_a, "blocks"_a, "f16"_a = true)
        .def_prop_ro("capacity", &KVBlockPool::capacity)
        .def_prop_ro("free_blocks", &KVBlockPool::free_blocks)
        .def_prop_ro("block_bytes", &KVBlockPool::block_bytes)
        .def_prop_ro("f16", &KVBlockPool::f16)
        .def("retain", &KVBlockPool::retain, "block"_a)
        .def("release", &KVBlockPool::release, "block"_a)
        .def("references", &KVBlockPool::references, "block"_a);

    nb::class_<KVCache>(m, "KVCache")
        .def(nb::init<const ModelShape&, int64_t, bool>(), "shape"_a, "n_ctx"_a, "f16"_a = true,
             "A sequence with a block pool of its own, just large enough for n_ctx positions.")
        .def(nb::init<std::shared_ptr<KVBlockPool>, int64_t>(), "pool"_a, "n_ctx"_a, "A sequence in a shared pool.")
        .def_prop_ro("n_ctx", &KVCache::n_ctx)
        .def_prop_ro("f16", &KVCache::f16)
        .def_prop_ro("pool", &KVCache::pool)
        .def_prop_ro("blocks", &KVCache::blocks, "the block table: block p // KV_BLOCK holds position p")
        .def_prop_ro("nbytes", &KVCache::bytes, "bytes of the blocks the sequence holds")
        .def("assign", &KVCache::assign, "blocks"_a, "Hold these blocks (retained) instead of the current ones.")
        .def("truncate", &KVCache::truncate, "positions"_a, "Keep the blocks of the first `positions` positions.")
        .def("share_prefix", &KVCache::share_prefix, "other"_a, "positions"_a,
             "Hold the blocks of other's first `positions` positions, without copying.")
        .def(
            "export_rows",
            [](const KVCache& c, int64_t positions) {
                const KVBlockPool& pool = *c.pool();
                const std::vector<size_t> shape = {size_t(pool.layers()), size_t(positions), size_t(pool.width())};
                if (pool.f16()) {
                    auto k = owned_array<uint16_t>(shape), v = owned_array<uint16_t>(shape);
                    c.export_rows(positions, k.data(), v.data());
                    return nb::make_tuple(k, v);
                }
                auto k = owned_array<float>(shape), v = owned_array<float>(shape);
                c.export_rows(positions, k.data(), v.data());
                return nb::make_tuple(k, v);
            },
            "positions"_a, "Keys and values of positions [0, positions): [layers, positions, kv width] each, "
                           "uint16 (f16 bits) or float32.")
        .def(
            "import_rows",
            [](KVCache& c, nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<3>> keys,
               nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<3>> values) {
                const KVBlockPool& pool = *c.pool();
                const size_t element = pool.f16() ? 2 : 4;
                if (keys.itemsize() != element || values.itemsize() != element || keys.shape(0) != size_t(pool.layers()) ||
                    keys.shape(2) != size_t(pool.width()) || values.shape(0) != keys.shape(0) ||
                    values.shape(1) != keys.shape(1) || values.shape(2) != keys.shape(2))
                    throw std::invalid_argument("keys and values do not have this cache's layers, width and type");
                c.import_rows(static_cast<int64_t>(keys.shape(1)), keys.data(), values.data());
            },
            "keys"_a, "values"_a, "Write positions [0, n) from arrays shaped as export_rows returns them.")
        .def("prepare", &KVCache::prepare, "start"_a, "end"_a,
             "Take the blocks for positions up to `end` now, those of [start, end) held by this cache alone.");

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
        [](Array<const float, nb::ndim<2>> q, Array<const uint16_t, nb::ndim<2>> keys,
           Array<const uint16_t, nb::ndim<2>> values, int64_t column, float scale, const std::string& kernel,
           int log2_block) {
            const int64_t heads = q.shape(0), head_dim = q.shape(1), count = keys.shape(0), width = keys.shape(1);
            if (count == 0 || values.shape(0) != keys.shape(0) || values.shape(1) != keys.shape(1) || column < 0 ||
                column + head_dim > width)
                throw std::invalid_argument("keys and values must be [count > 0, width] with the head inside width");
            auto out = owned_array<float>({size_t(heads), size_t(head_dim)});
            const F16AttentionFn attention = kernels_named(kernel).f16_attention;
            if (log2_block < 0 || log2_block > 30) throw std::invalid_argument("log2_block must be in [0, 30]");
            nb::gil_scoped_release release;
            // Blocks of 2^log2_block positions cut from the contiguous arrays, visited through a table.
            std::vector<const uint16_t*> key_blocks, value_blocks;
            for (int64_t j = 0; j < count; j += int64_t{1} << log2_block) {
                key_blocks.push_back(keys.data() + j * width + column);
                value_blocks.push_back(values.data() + j * width + column);
            }
            std::vector<float> scratch(static_cast<size_t>(heads * count));
            attention(q.data(), heads, head_dim, {key_blocks.data(), log2_block, width}, {value_blocks.data(), log2_block, width},
                      count, scale, scratch.data(), out.data());
            return out;
        },
        "q"_a, "keys"_a, "values"_a, "column"_a, "scale"_a, "kernel"_a = "", "log2_block"_a = 30,
        "softmax(scale * q k^T) v for the query heads q [heads, head_dim] sharing the KV head at columns "
        "[column, column + head_dim) of f16 keys and values [count, width], read in blocks of 2^log2_block "
        "positions (tests).");

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

    nb::class_<SamplingSettings>(m, "SamplingSettings")
        .def(
            "__init__",
            [](SamplingSettings* self, double temperature, int64_t top_k, double top_p, double min_p,
               double repetition_penalty) {
                new (self) SamplingSettings{temperature, top_k, top_p, min_p, repetition_penalty};
                self->validate();
            },
            "temperature"_a = 0.0, "top_k"_a = 0, "top_p"_a = 1.0, "min_p"_a = 0.0, "repetition_penalty"_a = 1.0)
        .def_ro("temperature", &SamplingSettings::temperature)
        .def_ro("top_k", &SamplingSettings::top_k)
        .def_ro("top_p", &SamplingSettings::top_p)
        .def_ro("min_p", &SamplingSettings::min_p)
        .def_ro("repetition_penalty", &SamplingSettings::repetition_penalty);

    m.def(
        "sample_tokens",
        [](Array<const float, nb::ndim<2>> logits, const std::vector<SamplingSettings>& settings,
           Array<const int32_t, nb::ndim<1>> recent, const std::vector<int64_t>& recent_lengths,
           Array<const double, nb::ndim<1>> uniforms) {
            const size_t rows = logits.shape(0);
            if (settings.size() != rows || recent_lengths.size() != rows || uniforms.shape(0) != rows)
                throw std::invalid_argument("sample_tokens needs one settings, recent-id count and uniform per row");
            std::vector<int64_t> offsets(rows + 1, 0);
            for (size_t r = 0; r < rows; ++r) {
                if (recent_lengths[r] < 0) throw std::invalid_argument("sample_tokens: a negative recent-id count");
                offsets[r + 1] = offsets[r] + recent_lengths[r];
            }
            if (offsets[rows] != static_cast<int64_t>(recent.shape(0)))
                throw std::invalid_argument("sample_tokens: the recent-id counts do not add up to the ids given");
            auto tokens = owned_array<int32_t>({rows});
            {
                nb::gil_scoped_release release;
                const int64_t vocab = static_cast<int64_t>(logits.shape(1));
                for (size_t r = 0; r < rows; ++r)
                    tokens.data()[r] = sample_token(logits.data() + r * vocab, vocab, settings[r],
                                                    recent.data() + offsets[r], recent_lengths[r], uniforms.data()[r]);
            }
            return tokens;
        },
        "logits"_a, "settings"_a, "recent"_a, "recent_lengths"_a, "uniforms"_a,
        "The next token of each row of logits [rows, vocab]: row r with settings[r], the repetition penalty on its "
        "recent_lengths[r] ids (recent holds every row's ids one after another) and the random number "
        "uniforms[r] in [0, 1). -inf logits are never drawn.");

    nb::class_<ModelShape>(m, "ModelShape")
        .def(nb::init<>())
        .def_rw("vocab", &ModelShape::vocab)
        .def_rw("hidden", &ModelShape::hidden)
        .def_rw("intermediate", &ModelShape::intermediate)
        .def_rw("layers", &ModelShape::layers)
        .def_rw("heads", &ModelShape::heads)
        .def_rw("kv_heads", &ModelShape::kv_heads)
        .def_rw("head_dim", &ModelShape::head_dim)
        .def_rw("rms_norm_eps", &ModelShape::rms_norm_eps)
        .def_rw("relu2", &ModelShape::relu2)
        .def_rw("sub_norms", &ModelShape::sub_norms)
        .def_rw("rope_inv_freq", &ModelShape::rope_inv_freq);

    nb::class_<PyModel>(m, "Model")
        .def(
            "__init__",
            [](PyModel* self, const ModelShape& shape, int threads, double ternary_bits) {
                new (self) PyModel{std::make_unique<Model>(shape, threads, parse_ternary_bits(ternary_bits)),
                                   nb::none(), nb::none()};
            },
            "shape"_a, "threads"_a, "ternary_bits"_a = 2.0)
        .def_prop_ro("ternary_bits", [](const PyModel& p) { return ternary_bits_of(p.model->ternary_layout()); })
        .def_prop_rw(
            "threads", [](const PyModel& p) { return p.model->threads(); },
            [](PyModel& p, int threads) { p.model->set_threads(threads); })
        .def_prop_ro("shape", [](const PyModel& p) { return p.model->shape(); })
        .def_prop_ro("weight_bytes", [](const PyModel& p) { return p.model->weight_bytes(); })
        .def(
            "set_norm",
            [](PyModel& p, int64_t layer, const std::string& name, Array<const float, nb::ndim<1>> w) {
                p.model->set_norm(layer, name, w.data(), static_cast<int64_t>(w.shape(0)));
            },
            "layer"_a, "name"_a, "weight"_a)
        .def(
            "set_linear",
            [](PyModel& p, int64_t layer, const std::string& name, Array<const int8_t, nb::ndim<2>> t,
               float scale) {
                nb::gil_scoped_release release;
                p.model->set_linear(layer, name, t.data(), static_cast<int64_t>(t.shape(0)),
                                    static_cast<int64_t>(t.shape(1)), scale);
            },
            "layer"_a, "name"_a, "ternary"_a, "scale"_a)
        .def(
            "set_linear_packed",
            [](PyModel& p, int64_t layer, const std::string& name, Array<const uint8_t, nb::ndim<1>> bytes,
               int64_t rows, int64_t cols, float scale) {
                if (static_cast<int64_t>(bytes.shape(0)) != rows * cols / 4)
                    throw std::invalid_argument(name + ": wrong number of packed bytes");
                nb::gil_scoped_release release;
                p.model->set_linear_packed(layer, name, bytes.data(), rows, cols, scale);
            },
            "layer"_a, "name"_a, "bytes"_a, "rows"_a, "cols"_a, "scale"_a)
        .def(
            "set_linear_tq",
            [](PyModel& p, int64_t layer, const std::string& name, Array<const uint8_t, nb::ndim<1>> blocks,
               bool tq1_0, int64_t rows, int64_t cols) {
                nb::gil_scoped_release release;
                p.model->set_linear_tq(layer, name, blocks.data(), static_cast<int64_t>(blocks.shape(0)), tq1_0, rows,
                                       cols);
            },
            "layer"_a, "name"_a, "blocks"_a, "tq1_0"_a, "rows"_a, "cols"_a)
        .def(
            "set_final_norm",
            [](PyModel& p, Array<const float, nb::ndim<1>> w) {
                p.model->set_final_norm(w.data(), static_cast<int64_t>(w.shape(0)));
            },
            "weight"_a)
        .def(
            "set_embedding",
            [](PyModel& p, nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a, const std::string& dtype,
               nb::object owner) {
                p.model->set_embedding(stored_view(a, dtype, p.model->shape().hidden));
                p.embedding_owner = owner;
            },
            "array"_a, "dtype"_a, "owner"_a,
            "Borrow a [vocab, hidden] matrix: floats (dtype float32, float16, bfloat16) or ggml blocks (dtype Q4_0, "
            "Q8_0, Q4_K, ...: uint8 [vocab, bytes per row]); `owner` is kept alive as long as the model.")
        .def("read_embedding_from", [](PyModel& p, int fd, int64_t offset) { p.model->read_embedding_from(fd, offset); },
             "fd"_a, "offset"_a,
             "Look embedding rows up with reads from this open file (the embedding starts at byte `offset`) "
             "rather than through the mapping; the model keeps a duplicate of the descriptor.")
        .def(
            "set_head",
            [](PyModel& p, nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>> a, const std::string& dtype,
               nb::object owner) {
                p.model->set_head(stored_view(a, dtype, p.model->shape().hidden));
                p.head_owner = owner;
            },
            "array"_a, "dtype"_a, "owner"_a)
        .def("check_complete", [](const PyModel& p) { p.model->check_complete(); })
        .def(
            "quantize_head",
            [](PyModel& p, const std::string& format, int64_t begin, int64_t end) {
                if (format != "int8" && format != "q4") throw std::invalid_argument("head format must be int8 or q4");
                nb::gil_scoped_release release;
                p.model->quantize_head(format == "int8" ? HeadFormat::Int8 : HeadFormat::Q4, begin, end);
            },
            "format"_a, "begin"_a, "end"_a,
            "Convert head rows [begin, end) to int8 or q4 (once all rows are done, the head is in that format).")
        .def_prop_ro("head_bytes", [](const PyModel& p) { return p.model->head_bytes(); })
        .def(
            "forward",
            [](PyModel& p, KVCache& cache, Array<const int32_t, nb::ndim<1>> tokens, int64_t start_pos,
               bool all_logits) {
                const int64_t T = static_cast<int64_t>(tokens.shape(0));
                const int64_t rows = all_logits ? T : 1;
                auto logits = owned_array<float>({size_t(rows), size_t(p.model->shape().vocab)});
                {
                    nb::gil_scoped_release release;
                    p.model->forward(cache, tokens.data(), T, start_pos, logits.data(), all_logits);
                }
                return logits;
            },
            "cache"_a, "tokens"_a, "start_pos"_a, "all_logits"_a = false,
            "Run tokens at positions start_pos.. and return float32 logits [T or 1, vocab].")
        .def(
            "forward_batch",
            [](PyModel& p, const std::vector<KVCache*>& caches, Array<const int32_t, nb::ndim<1>> tokens,
               const std::vector<int64_t>& lengths, const std::vector<int64_t>& start_positions,
               const std::vector<bool>& logits_for, bool all_logits) {
                if (lengths.size() != caches.size() || start_positions.size() != caches.size() ||
                    logits_for.size() != caches.size())
                    throw std::invalid_argument("forward_batch needs one length, start position and logits flag per cache");
                std::vector<Segment> segments;
                int64_t offset = 0;
                size_t rows = 0;
                for (size_t i = 0; i < caches.size(); ++i) {
                    if (lengths[i] <= 0 || offset + lengths[i] > static_cast<int64_t>(tokens.shape(0)))
                        throw std::invalid_argument("forward_batch: lengths do not add up to the tokens given");
                    segments.push_back({caches[i], tokens.data() + offset, lengths[i], start_positions[i], logits_for[i]});
                    offset += lengths[i];
                    if (logits_for[i]) rows += all_logits ? static_cast<size_t>(lengths[i]) : 1;
                }
                if (offset != static_cast<int64_t>(tokens.shape(0)))
                    throw std::invalid_argument("forward_batch: lengths do not add up to the tokens given");
                auto logits = owned_array<float>({rows, size_t(p.model->shape().vocab)});
                {
                    nb::gil_scoped_release release;
                    p.model->forward(segments, logits.data(), all_logits);
                }
                return logits;
            },
            "caches"_a, "tokens"_a, "lengths"_a, "start_positions"_a, "logits_for"_a, "all_logits"_a = false,
            "One step over several sequences: tokens holds each sequence's tokens one after another. Returns "
            "logits [rows, vocab] for the last token (every token with all_logits) of each sequence whose "
            "logits_for flag is set, in order.");
}
