// Python bindings of the core (the module ternlm._core). Every heavy call releases the GIL.
#include <nanobind/stl/shared_ptr.h>

#include <cstring>
#include <memory>

#include "bindings.h"
#include "sampler.h"

namespace ternlm {

// A model plus the Python objects that own the memory it borrows (memory-mapped embeddings).
struct PyModel {
    std::unique_ptr<Model> model;
    nb::object embedding_owner, head_owner;
};

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
    m.def("unavailable_kernels_note", &unavailable_kernels_note,
          "why a variant whose instructions the CPU has cannot run (the OS refused AMX), or ''");
    m.def("default_threads", &default_thread_count);
    m.def("measure_read_bandwidth", &measure_read_bandwidth, "bytes"_a, "threads"_a, "repeats"_a = 5,
          nb::call_guard<nb::gil_scoped_release>(), "Best GB/s reading `bytes` of memory with `threads` threads.");

    bind_kernel_checks(m.def_submodule("kernels", "Every kernel variant by name, on given inputs: what the tests compare "
                                                   "with NumPy and with each other. Not used by ternlm itself."));

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
