// The sampler (sampler.h). Its passes over the vocabulary are plain loops the compiler vectorizes:
// sums go through kLanes independent partial sums (the build does not let it reorder a
// floating-point sum), a sum of some weights multiplies each by its condition (GCC turns a select
// into a branch, mispredicted half the time), and the tempering with its e^x is a kernel with an
// AVX2 variant (kernels.h).
#include "sampler.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "tempering.h"

namespace ternlm {

namespace {

constexpr float kInfinity = std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;    // partial sums: two AVX2 registers' worth
constexpr int64_t kBlock = 1024;  // the draw first finds the block of this many ids, then the id
constexpr int kAttempts = 8;      // draws top-p tries before it finds its nucleus by histogram

// A token in the rank order: most likely first (the larger logit after the penalty), ties by lower id.
struct Ranked {
    float value, weight;
    int32_t id;
};

struct RanksBefore {  // a type rather than a function, so that std::sort and the heap inline it
    bool operator()(const Ranked& a, const Ranked& b) const {
        return a.value > b.value || (a.value == b.value && a.id < b.id);
    }
};
constexpr RanksBefore ranks_before;

// A prefix of the rank order, given by its last token: keeps the tokens with a larger logit, and those
// with the same logit up to its id.
struct Cut {
    float logit;
    int32_t id;
    bool keeps(float value, int32_t i) const { return value > logit || (value == logit && i <= id); }
};

// Buckets of the tempered distance d = (max - logit) / temperature, in rank order: 128 per octave of
// 1 + d, so fine near the likely tokens; the last holds every d >= 255 (weights below e^-255, which are 0 in float).
constexpr int kBuckets = 1024;
uint16_t bucket_of(float d) {
    const uint32_t steps = (bits_as<uint32_t>(1.0f + d) - bits_as<uint32_t>(1.0f)) >> 16;
    return static_cast<uint16_t>(std::min<uint32_t>(steps, kBuckets - 1));
}

// Working memory, one vocabulary's worth, kept between draws: allocating (and faulting in) a few MB
// for each draw would cost more than the draw.
struct Scratch {
    std::vector<float> penalized, distance, weight;
    std::vector<uint16_t> bucket;
    std::vector<int32_t> first_in_bucket, next_in_bucket;
    std::vector<double> block_sums;
    std::vector<float> bucket_masses;
    std::vector<Ranked> ranked;
};
thread_local Scratch scratch;

// The logits after the repetition penalty: a copy when it applies, else the logits themselves.
const float* penalize(const float* logits, int64_t vocab, double penalty, const int32_t* recent, int64_t n_recent) {
    if (penalty == 1.0 || n_recent == 0) return logits;
    scratch.penalized.assign(logits, logits + vocab);
    for (int64_t k = 0; k < n_recent; ++k) {  // from the original logit: a repeated id is penalized once
        const float v = logits[recent[k]];
        if (!std::isfinite(v)) continue;  // a masked token stays masked
        // in double and clamped: a penalty near 0 (or far above 1) must not make a finite logit infinite
        const double penalized = v > 0 ? v / penalty : v * penalty;
        scratch.penalized[recent[k]] = static_cast<float>(std::clamp<double>(penalized, -FLT_MAX, FLT_MAX));
    }
    return scratch.penalized.data();
}

bool any_nan_or_infinite(const float* row, int64_t vocab) {
    int32_t lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= vocab; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] |= !(row[i + j] <= FLT_MAX);
    for (; i < vocab; ++i) lanes[0] |= !(row[i] <= FLT_MAX);
    return std::any_of(lanes, lanes + kLanes, [](int32_t lane) { return lane != 0; });
}

// Floats as integers in the same order (-0 before +0; NaN aside): GCC vectorizes a maximum over
// integers, not over floats unless told to ignore NaN.
int32_t ordered(float x) {
    const int32_t bits = bits_as<int32_t>(x);
    return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

// The largest logit; throws unless every logit is finite or -inf and one is finite.
float largest(const float* row, int64_t vocab) {
    if (any_nan_or_infinite(row, vocab)) throw std::invalid_argument("the logits hold NaN or +inf");
    int32_t lanes[kLanes];
    std::fill(lanes, lanes + kLanes, std::numeric_limits<int32_t>::min());
    int64_t i = 0;
    for (; i + kLanes <= vocab; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] = std::max(lanes[j], ordered(row[i + j]));
    for (; i < vocab; ++i) lanes[0] = std::max(lanes[0], ordered(row[i]));
    const int32_t best = *std::max_element(lanes, lanes + kLanes);
    const float value = bits_as<float>(best >= 0 ? best : best ^ 0x7FFFFFFF);
    if (value == -kInfinity) throw std::invalid_argument("every logit is -inf: no token is allowed");
    return value;
}

// The sum of the weights of at least min_weight.
double sum_of_weights(const float* x, int64_t n, float min_weight = 0.0f) {
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * float(x[i + j] >= min_weight);
    double total = 0.0;
    for (float lane : lanes) total += lane;
    for (; i < n; ++i) total += x[i] * float(x[i] >= min_weight);
    return total;
}

// An inverse CDF over the weights of at least min_weight (the others count as 0), in index order:
// the first index whose running sum exceeds uniform * total. The block sums are taken once, so each
// further uniform costs the scan of one block.
class InverseCdf {
  public:
    InverseCdf(const float* weight, int64_t n, float min_weight) : weight_(weight), n_(n), min_weight_(min_weight) {
        const int64_t blocks = (n + kBlock - 1) / kBlock;
        scratch.block_sums.resize(blocks);
        for (int64_t b = 0; b < blocks; ++b) {
            scratch.block_sums[b] = sum_of_weights(weight + b * kBlock, std::min(kBlock, n - b * kBlock), min_weight);
            total_ += scratch.block_sums[b];
        }
    }

    int64_t operator()(double uniform) const {
        const std::vector<double>& block_sums = scratch.block_sums;
        const double target = uniform * total_;
        double below = 0.0;
        int64_t b = 0;
        while (b + 1 < static_cast<int64_t>(block_sums.size()) && below + block_sums[b] <= target) below += block_sums[b++];
        for (int64_t i = b * kBlock; i < n_; ++i) {
            const float w = weight(i);
            below += w;
            if (below > target && w > 0) return i;
        }
        int64_t i = n_ - 1;  // rounding left the target at the very end: the last index with weight
        while (weight(i) == 0) --i;
        return i;
    }

  private:
    float weight(int64_t i) const { return weight_[i] >= min_weight_ ? weight_[i] : 0.0f; }
    const float* weight_;
    int64_t n_;
    float min_weight_;
    double total_ = 0.0;
};

// The k most likely tokens (k <= vocab) into scratch.ranked, best first. One pass keeps a heap of the
// k best so far: a token displaces the worst of them only if its logit is larger (a tie ranks after,
// by id).
const std::vector<Ranked>& select_best(const float* row, int64_t vocab, int64_t k) {
    std::vector<Ranked>& best = scratch.ranked;
    best.clear();
    for (int32_t i = 0; i < k; ++i) best.push_back({row[i], 0.0f, i});
    std::make_heap(best.begin(), best.end(), ranks_before);
    float worst = best.front().value;
    for (int64_t start = k; start < vocab; start += kLanes) {
        const int64_t end = std::min(start + kLanes, vocab);
        int32_t above = 0;  // whether any of these kLanes logits can enter: a test that vectorizes
        for (int64_t i = start; i < end; ++i) above |= row[i] > worst;
        if (!above) continue;
        for (int32_t i = static_cast<int32_t>(start); i < end; ++i)
            if (row[i] > worst) {
                std::pop_heap(best.begin(), best.end(), ranks_before);
                best.back() = {row[i], 0.0f, i};
                std::push_heap(best.begin(), best.end(), ranks_before);
                worst = best.front().value;
            }
    }
    std::sort_heap(best.begin(), best.end(), ranks_before);
    return best;
}

// top-p (to `needed` of mass), then min-p and the draw, among the first tokens of the rank order,
// given with their weights (top-k's tokens).
int32_t draw_among(const std::vector<Ranked>& ranked, const float* weight, double needed, double min_p, double uniform) {
    const int64_t n = static_cast<int64_t>(ranked.size());
    int64_t kept = 0;
    double mass = 0.0;
    while (kept < n && mass < needed) mass += weight[kept++];
    const float min_weight = static_cast<float>(min_p);  // against the largest weight, which is 1
    return ranked[InverseCdf(weight, kept, min_weight)(uniform)].id;
}

// top-k, then the other filters on its k tokens alone.
int32_t sample_top_k(const float* row, int64_t vocab, const SamplingSettings& settings, float inverse_temperature,
                     double uniform) {
    const std::vector<Ranked>& best = select_best(row, vocab, settings.top_k);
    const int64_t k = static_cast<int64_t>(best.size());
    scratch.weight.resize(k);
    float* weight = scratch.weight.data();
    for (int64_t j = 0; j < k; ++j) weight[j] = exp_minus((best[0].value - best[j].value) * inverse_temperature);
    // the nucleus of the distribution renormalized over the k tokens
    return draw_among(best, weight, settings.top_p * sum_of_weights(weight, k), settings.min_p, uniform);
}

// The mass of the tokens ranked before `token`: a larger logit, or the same one and a lower id.
double mass_before(const float* row, const float* weight, int64_t vocab, int32_t token) {
    const float value = row[token];
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= token; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += weight[i + j] * float(row[i + j] >= value);
    for (; i < token; ++i) lanes[0] += weight[i] * float(row[i] >= value);
    for (i = token + 1; i + kLanes <= vocab; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += weight[i + j] * float(row[i + j] > value);
    for (; i < vocab; ++i) lanes[0] += weight[i] * float(row[i] > value);
    double total = 0.0;
    for (float lane : lanes) total += lane;
    return total;
}

// A further uniform number in [0, 1) from one (splitmix64 of its bits): the same uniform always
// gives the same token, however many draws top-p takes.
double next_uniform(double uniform) {
    uint64_t z = bits_as<uint64_t>(uniform) + 0x9E3779B97F4A7C15u;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

// Where top-p's nucleus ends: a histogram of the weights by distance bucket finds the bucket where
// it ends, and only that bucket's tokens are sorted.
Cut nucleus(const float* row, int64_t vocab, double needed) {
    const float* distance = scratch.distance.data();
    const float* weight = scratch.weight.data();
    std::vector<uint16_t>& bucket = scratch.bucket;
    bucket.resize(vocab);
    for (int64_t i = 0; i < vocab; ++i) bucket[i] = bucket_of(distance[i]);  // a pass of its own vectorizes
    // Four histograms, a token's going by its id: an addition need not wait for the one before it,
    // which often lands in the same bucket.
    std::vector<float>& masses = scratch.bucket_masses;
    masses.assign(4 * kBuckets, 0.0f);
    std::vector<int32_t>& first = scratch.first_in_bucket;  // each bucket's tokens chained through next_in_bucket
    std::vector<int32_t>& next = scratch.next_in_bucket;
    first.assign(kBuckets, -1);
    next.resize(vocab);
    for (int32_t i = 0; i < vocab; ++i) {
        masses[(i & 3) * kBuckets + bucket[i]] += weight[i];
        next[i] = first[bucket[i]];
        first[bucket[i]] = i;
    }
    double mass = 0.0;
    int b = 0;
    const auto bucket_mass = [&](int b) {
        return double(masses[b]) + masses[kBuckets + b] + masses[2 * kBuckets + b] + masses[3 * kBuckets + b];
    };
    while (b < kBuckets && mass + bucket_mass(b) < needed) mass += bucket_mass(b++);
    if (b == kBuckets) return {-kInfinity, static_cast<int32_t>(vocab)};  // beyond the whole mass by rounding: all
    std::vector<Ranked>& boundary = scratch.ranked;
    boundary.clear();
    for (int32_t i = first[b]; i >= 0; i = next[i]) boundary.push_back({row[i], weight[i], i});
    std::sort(boundary.begin(), boundary.end(), ranks_before);
    size_t last = 0;
    for (mass += boundary[0].weight; last + 1 < boundary.size() && mass < needed;) mass += boundary[++last].weight;
    return {boundary[last].value, boundary[last].id};
}

}  // namespace

void SamplingSettings::validate() const {
    if (!(temperature >= 0)) throw std::invalid_argument("temperature must be >= 0, got " + std::to_string(temperature));
    if (top_k < 0) throw std::invalid_argument("top_k must be >= 0, got " + std::to_string(top_k));
    if (!(top_p > 0 && top_p <= 1)) throw std::invalid_argument("top_p must be in (0, 1], got " + std::to_string(top_p));
    if (!(min_p >= 0 && min_p <= 1)) throw std::invalid_argument("min_p must be in [0, 1], got " + std::to_string(min_p));
    if (!(repetition_penalty > 0))
        throw std::invalid_argument("repetition_penalty must be > 0, got " + std::to_string(repetition_penalty));
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingSettings& settings, const int32_t* recent,
                     int64_t n_recent, double uniform) {
    settings.validate();
    if (vocab < 1 || vocab > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("bad vocabulary size");
    if (!(uniform >= 0 && uniform < 1)) throw std::invalid_argument("the uniform random number must be in [0, 1)");
    for (int64_t k = 0; k < n_recent; ++k)
        if (recent[k] < 0 || recent[k] >= vocab)
            throw std::invalid_argument("recent token id " + std::to_string(recent[k]) + " is outside the vocabulary");
    const float* row = penalize(logits, vocab, settings.repetition_penalty, recent, n_recent);
    const float max = largest(row, vocab);
    if (settings.temperature == 0) return static_cast<int32_t>(std::find(row, row + vocab, max) - row);

    // Weights e^-d of the distances d = (max - logit) / temperature >= 0: the largest weighs 1. An
    // inverse temperature beyond float's range is clamped; the limit, uniform over the tokens tied
    // for the largest logit, stays the same.
    const float inverse_temperature = static_cast<float>(std::min(1.0 / settings.temperature, double(FLT_MAX)));
    if (settings.top_k > 0 && settings.top_k < vocab) return sample_top_k(row, vocab, settings, inverse_temperature, uniform);
    scratch.distance.resize(vocab);
    scratch.weight.resize(vocab);
    float* distance = scratch.distance.data();
    float* weight = scratch.weight.data();
    active_kernels().temper(row, vocab, max, inverse_temperature, distance, weight);
    const float min_weight = static_cast<float>(settings.min_p);  // against the largest weight, which is 1
    const InverseCdf draw(weight, vocab, min_weight);
    if (settings.top_p == 1) return static_cast<int32_t>(draw(uniform));

    // top-p by rejection: a token drawn from the min-p-filtered distribution is kept if it is in the
    // nucleus (the tokens ranked before it weigh less than `needed`), which leaves exactly the
    // distribution filtered by both. The nucleus holds at least top_p of the mass, so a draw is kept
    // with probability top_p or more; after kAttempts misses, the histogram finds the nucleus.
    const double needed = settings.top_p * sum_of_weights(weight, vocab);
    for (int attempt = 0; attempt < kAttempts; ++attempt, uniform = next_uniform(uniform)) {
        const int32_t token = static_cast<int32_t>(draw(uniform));
        if (mass_before(row, weight, vocab, token) < needed) return token;
    }
    const Cut kept = nucleus(row, vocab, needed);
    for (int32_t i = 0; i < vocab; ++i) weight[i] = kept.keeps(row[i], i) ? weight[i] : 0.0f;
    return static_cast<int32_t>(InverseCdf(weight, vocab, min_weight)(uniform));
}

}  // namespace ternlm
