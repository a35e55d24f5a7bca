#include "threads.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace ternlm {

int default_thread_count() {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

ThreadPool::ThreadPool(int threads) {
    const int extra = std::max(threads, 1) - 1;
    for (int i = 0; i < extra; ++i) workers_.emplace_back([this] { worker_loop(); });
}

namespace {

// About 50-100 microseconds of polling before a thread goes to sleep.
constexpr int kSpins = 20000;
// Chunks per thread: enough for a fast thread to take over a slow one's work, few enough that
// each chunk is a long run of consecutive weight rows for the prefetchers.
constexpr int64_t kChunksPerThread = 8;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

inline uint32_t generation_of(uint64_t ticket) { return static_cast<uint32_t>(ticket >> 32); }

}  // namespace

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

bool ThreadPool::run_chunk(uint32_t generation) {
    Job& job = jobs_[generation & 1];
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    int64_t index, chunks;
    do {
        index = static_cast<int64_t>(ticket & 0xffffffffu);
        chunks = job.chunks.load(std::memory_order_relaxed);
        if (generation_of(ticket) != generation || index >= chunks) return false;
    } while (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel, std::memory_order_acquire));
    const int64_t n = job.n.load(std::memory_order_relaxed), chunk = job.chunk.load(std::memory_order_relaxed);
    (*job.fn.load(std::memory_order_relaxed))(index * chunk, std::min(n, (index + 1) * chunk));
    if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex_);  // pairs with the caller's sleep in parallel_for
        finished_.notify_one();
    }
    return true;
}

void ThreadPool::worker_loop() {
    uint32_t seen = 0;
    const auto has_news = [&] { return stopping_ || generation_of(ticket_.load(std::memory_order_acquire)) != seen; };
    for (;;) {
        for (int i = 0; i < kSpins && !has_news(); ++i) cpu_relax();
        if (!has_news()) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, has_news);
        }
        if (stopping_) return;
        seen = generation_of(ticket_.load(std::memory_order_acquire));
        while (run_chunk(seen)) {
        }
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    if (workers_.empty() || n <= grain) {
        fn(0, n);
        return;
    }
    const int64_t grains = (n + grain - 1) / grain;
    const int64_t target = std::min(grains, size() * kChunksPerThread);
    const int64_t chunk = (grains + target - 1) / target * grain;
    const int64_t chunks = (n + chunk - 1) / chunk;
    const uint32_t generation = generation_of(ticket_.load(std::memory_order_relaxed)) + 1;  // only callers move it
    Job& job = jobs_[generation & 1];
    job.fn.store(&fn, std::memory_order_relaxed);
    job.n.store(n, std::memory_order_relaxed);
    job.chunk.store(chunk, std::memory_order_relaxed);
    job.chunks.store(chunks, std::memory_order_relaxed);
    job.done.store(0, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(mutex_);  // a worker between its check and its sleep holds it
        ticket_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_release);
    }
    wake_.notify_all();
    while (run_chunk(generation)) {
    }
    const auto all_done = [&] { return job.done.load(std::memory_order_acquire) == chunks; };
    for (int i = 0; i < kSpins && !all_done(); ++i) cpu_relax();
    if (!all_done()) {
        std::unique_lock<std::mutex> lock(mutex_);
        finished_.wait(lock, all_done);
    }
}

double measure_read_bandwidth(int64_t bytes, int threads, int repeats) {
    const int64_t words = bytes / 8;
    std::vector<uint64_t> buffer(static_cast<size_t>(words));
    for (int64_t i = 0; i < words; ++i) buffer[i] = static_cast<uint64_t>(i);  // touch every page
    ThreadPool pool(threads);
    std::atomic<uint64_t> sink{0};
    double best = 0.0;
    for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        pool.parallel_for(words, 4096, [&](int64_t begin, int64_t end) {
            uint64_t a = 0, b = 0, c = 0, d = 0;  // four chains keep the loads in flight
            int64_t i = begin;
            for (; i + 4 <= end; i += 4) {
                a += buffer[i];
                b += buffer[i + 1];
                c += buffer[i + 2];
                d += buffer[i + 3];
            }
            for (; i < end; ++i) a += buffer[i];
            sink.fetch_add(a + b + c + d, std::memory_order_relaxed);
        });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = std::max(best, static_cast<double>(words * 8) / seconds / 1e9);
    }
    volatile uint64_t keep = sink.load();
    (void)keep;
    return best;
}

}  // namespace ternlm
