"""What /metrics reports, in Prometheus' text format."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_SECONDS = 10.0


class RecentRate:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS):
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # added to by the scheduler thread, read by the HTTP thread

    def add(self, count: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), count))

    def per_second(self) -> float:
        horizon = time.monotonic() - self.window
        with self._lock:
            while self._events and self._events[0][0] < horizon:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window


class ServerMetrics:
    """Counters the scheduler and the HTTP layer update, plus gauges read from the scheduler when scraped.
    Each server has its own registry, so several can run in one process (the tests do)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.responses = Counter("ternlm_http_responses", "HTTP responses by path and status", ["path", "status"],
                                 registry=r)
        self.requests = Counter("ternlm_requests", "Generation requests that ended, by how: stop, length, "
                                "cancelled (the client left), timeout (--request-timeout) or error", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("ternlm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("ternlm_generated_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram("ternlm_batch_size", "Sequences in each engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.time_to_first_token = Histogram("ternlm_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.token_rate = RecentRate()
        Gauge("ternlm_generated_tokens_per_second", f"Tokens generated per second over the last "
              f"{RATE_WINDOW_SECONDS:g} s", registry=r).set_function(self.token_rate.per_second)

    def watch(self, scheduler) -> None:
        """Gauges that read the scheduler's state at each scrape."""
        r = self.registry
        Gauge("ternlm_queue_length", "Requests waiting for a slot", registry=r).set_function(
            lambda: len(scheduler.waiting))
        Gauge("ternlm_active_sequences", "Sequences in the running batch", registry=r).set_function(
            lambda: len(scheduler.running))
        Gauge("ternlm_kv_cache_bytes", "KV-cache bytes held by running sequences (a block several share counted "
              "once)", registry=r).set_function(lambda: scheduler.kv_bytes_in_use)
        Gauge("ternlm_kv_cache_budget_bytes", "KV-cache budget of all sequences together", registry=r).set_function(
            lambda: scheduler.kv_budget)
        if scheduler.prompt_cache is not None:
            r.register(_PromptCacheCollector(scheduler.prompt_cache))

    def step(self, sequences: int, prompt_tokens: int, generated_tokens: int) -> None:
        self.batch_size.observe(sequences)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        self.token_rate.add(generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PromptCacheCollector:
    """The prompt cache's own counts (prompt_cache.py), read at each scrape."""

    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        stats = self.cache.stats
        yield CounterMetricFamily("ternlm_prompt_cache_hits", "Requests that started from cached prompt blocks",
                                  value=stats.hits)
        yield CounterMetricFamily("ternlm_prompt_cache_cached_tokens", "Prompt tokens taken from the prompt cache "
                                  "rather than computed", value=stats.cached_tokens)
        yield CounterMetricFamily("ternlm_prompt_cache_evictions", "Cached blocks dropped to make room",
                                  value=stats.evictions)
        yield GaugeMetricFamily("ternlm_prompt_cache_bytes", "KV-cache bytes the prompt cache holds (running "
                                "sequences may share them)", value=self.cache.nbytes)
