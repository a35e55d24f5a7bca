// One persistent pool of worker threads; the calling thread works too. A job is cut into a few
// chunks per thread that threads claim one at a time, so a thread the OS has descheduled (another
// process on its core) delays nobody: the others take its chunks, and the caller never waits for a
// worker that has not started. Between jobs, workers spin briefly before sleeping: a decode step
// hands out a few hundred small jobs, and waking a sleeping thread costs more than many of them.
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

    // Runs fn(begin, end) over contiguous ranges covering [0, n), in parallel, and returns when all
    // are done. Ranges are multiples of `grain` except the last; which thread runs which range is
    // not fixed. One caller at a time.
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

private:
    // One parallel_for. Two slots, alternating by generation: a worker that wakes late reads the
    // slot of its generation, which the caller rewrites only two jobs later, and its claim (a
    // compare-exchange on ticket_) fails if that has happened.
    struct Job {
        std::atomic<const std::function<void(int64_t, int64_t)>*> fn{nullptr};
        std::atomic<int64_t> n{0}, chunk{1}, chunks{0}, done{0};
    };
    bool run_chunk(uint32_t generation);  // claims and runs one chunk; false when none is left
    void worker_loop();

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_, finished_;
    Job jobs_[2];
    std::atomic<uint64_t> ticket_{0};  // generation << 32 | next unclaimed chunk
    std::atomic<bool> stopping_{false};
};

int default_thread_count();

// Reads `bytes` of memory `repeats` times with `threads` threads; returns the best GB/s seen.
// The DRAM bound that bench reports decode speed against.
double measure_read_bandwidth(int64_t bytes, int threads, int repeats);

}  // namespace ternlm
