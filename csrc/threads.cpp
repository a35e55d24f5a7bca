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
    for (int i = 0; i < extra; ++i) workers_.emplace_back([this, i] { worker_loop(i + 1); });
}

namespace {

// About 50-100 microseconds of polling before a thread goes to sleep.
constexpr int kSpins = 20000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

}  // namespace

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::run_share(int index) {
    const int64_t parts = size();
    const int64_t grains = (job_n_ + job_grain_ - 1) / job_grain_;
    const int64_t begin = std::min(job_n_, grains * index / parts * job_grain_);
    const int64_t end = std::min(job_n_, grains * (index + 1) / parts * job_grain_);
    if (begin < end) (*job_)(begin, end);
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        for (int i = 0; i < kSpins && generation_.load(std::memory_order_acquire) == seen && !stopping_; ++i)
            cpu_relax();
        if (generation_.load(std::memory_order_acquire) == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return stopping_ || generation_.load() != seen; });
        }
        if (stopping_) return;
        seen = generation_.load(std::memory_order_acquire);
        run_share(index);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);  // pairs with the caller's sleep below
            done_.notify_one();
        }
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n <= grain) {
        fn(0, n);
        return;
    }
    job_ = &fn;
    job_n_ = n;
    job_grain_ = std::max<int64_t>(grain, 1);
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(mutex_);  // a worker between its check and its sleep holds it
        generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_share(0);
    for (int i = 0; i < kSpins && pending_.load(std::memory_order_acquire) != 0; ++i) cpu_relax();
    if (pending_.load(std::memory_order_acquire) != 0) {
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
}

double measure_read_bandwidth(int64_t bytes, int threads, int repeats) {
    const int64_t words = bytes / 8;
    std::vector<uint64_t> buffer(static_cast<size_t>(words));
    for (int64_t i = 0; i < words; ++i) buffer[i] = static_cast<uint64_t>(i);  // touch every page
    ThreadPool pool(threads);
    std::vector<uint64_t> sinks(static_cast<size_t>(threads) * 8, 0);
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
            sinks[static_cast<size_t>(begin * threads / words) * 8] += a + b + c + d;
        });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = std::max(best, static_cast<double>(words * 8) / seconds / 1e9);
    }
    volatile uint64_t keep = 0;
    for (uint64_t s : sinks) keep = keep + s;
    return best;
}

}  // namespace ternlm
