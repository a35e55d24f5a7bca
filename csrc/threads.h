// One persistent pool of worker threads; the calling thread works too. Between jobs, workers spin
// briefly before sleeping: a decode step hands out a few hundred small jobs, and waking a sleeping
// thread costs more than many of them.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ternlm {

class ThreadPool {
public:
    explicit ThreadPool(int threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return static_cast<int>(workers_.size()) + 1; }

    // Splits [0, n) into size() contiguous ranges and runs fn(begin, end) on each, in parallel.
    // Ranges are multiples of `grain` except the last. Returns when all are done.
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

private:
    void worker_loop(int index);
    void run_share(int index);

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    const std::function<void(int64_t, int64_t)>* job_ = nullptr;  // written before generation_ moves
    int64_t job_n_ = 0, job_grain_ = 1;
    std::atomic<uint64_t> generation_{0};  // one more per job
    std::atomic<int> pending_{0};          // workers still busy with the current job
    std::atomic<bool> stopping_{false};
};

int default_thread_count();

// Reads `bytes` of memory `repeats` times with `threads` threads; returns the best GB/s seen.
// The DRAM bound that bench reports decode speed against.
double measure_read_bandwidth(int64_t bytes, int threads, int repeats);

}  // namespace ternlm
