// Choosing the next token from logits, as the README's "Sampling" section documents: the repetition
// penalty on the recent ids, then temperature, top-k, top-p and min-p, then one draw.
//
// No filter sorts the vocabulary. They are defined on the rank order (the penalized logits, largest
// first, ties by lower id, as a stable sort gives), of which top-k and top-p keep a prefix. top-k
// takes one pass that keeps a heap of the k best. top-p draws from the distribution the other
// filters leave and keeps the token if the tokens ranked before it weigh less than the nucleus's
// mass (one pass), else draws again; after a few misses a histogram of the tempered logits finds the
// nucleus, sorting only the tokens of the bucket where it ends. min-p is a threshold against the
// largest probability. The draw is an inverse CDF over the kept tokens, in id order (rank order
// after top-k), which gives the same distribution as one in rank order.
#pragma once
#include <cstdint>

namespace ternlm {

struct SamplingSettings {
    double temperature = 0.0;         // 0: greedy
    int64_t top_k = 0;                // 0: every token
    double top_p = 1.0;
    double min_p = 0.0;
    double repetition_penalty = 1.0;  // on the recent ids: positive logits divided by it, negative ones multiplied

    void validate() const;  // throws std::invalid_argument naming the bad setting
};

// One token from logits [vocab]. recent: the ids the repetition penalty applies to (repeats change
// nothing). uniform in [0, 1): the draw's random number (top-p derives those of further draws from
// it); the same logits, settings, recent ids and uniform always give the same token. Tokens whose
// logit is -inf (masked) have probability 0 under every filter and greedy picks the best finite one;
// NaN or +inf logits, or no finite one, throw std::invalid_argument.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingSettings& settings, const int32_t* recent,
                     int64_t n_recent, double uniform);

}  // namespace ternlm
