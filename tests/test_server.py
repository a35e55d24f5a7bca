"""`ternlm serve`: a real server on a loopback port, driven with the official openai client.

Answers are checked against an independent path: a second copy of the model generating alone through
LanguageModel.generate / chat (greedy, so batching must not change a single token). Models run on one
thread: on a machine shared with other jobs, a two-thread pool spends most of its time waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import ternlm
from ternlm.cli import build_parser
from ternlm.server import ServerOptions, create_app, serving_in_thread
from ternlm.prompt_cache import KV_BLOCK

MODEL_ID = "ternlm-default"
PROMPTS = ["To be, or not to be", "ROMEO:", "Now is the winter", "KING HENRY:", "O, what a rogue", "Friends, Romans"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


class GatedEngine:
    """The server's engine, except that the test can hold its batched steps: this makes "while a
    request is running" or "while requests are queued" deterministic, whatever the machine's speed."""

    def __init__(self, engine):
        self._engine = engine
        self._steps_allowed: int | None = None  # None: as many as the scheduler likes
        self._changed = threading.Condition()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @contextmanager
    def held(self, after_steps: int = 0):
        """Lets `after_steps` more steps run, then holds the next until the block ends."""
        with self._changed:
            self._steps_allowed = after_steps
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        with self._changed:
            self._steps_allowed = None
            self._changed.notify_all()

    def forward_batch(self, segments, logits_for=None):
        with self._changed:
            if not self._changed.wait_for(lambda: self._steps_allowed is None or self._steps_allowed > 0, timeout=60):
                raise TimeoutError("the test never released the engine")
            if self._steps_allowed is not None:
                self._steps_allowed -= 1
        return self._engine.forward_batch(segments, logits_for)


@contextmanager
def running_server(model=None, **options):
    """A server for `model` (default: a fresh copy of the shipped model behind a GatedEngine) in a
    thread; yields (base URL, the app's served model)."""
    if model is None:
        model = ternlm.load(threads=1)
        model.engine = GatedEngine(model.engine)
    app = create_app(model, MODEL_ID, ServerOptions(**options))
    with serving_in_thread(app) as url:
        try:
            yield url, app.state.served
        finally:
            if isinstance(model.engine, GatedEngine):
                model.engine.release()  # a test that failed while holding it must not hang the shutdown


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'ternlm_requests_total{finish_reason="stop"}'."""
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


@pytest.fixture(scope="module")
def reference():
    """The independent path: the shipped model generating one sequence at a time."""
    return ternlm.load(threads=1)


@pytest.fixture(scope="module")
def server():
    with running_server(max_batch=8, max_waiting=16) as (url, served):
        yield url, served


# ---- the API, answer by answer ----

def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL_ID]
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL_ID}


def test_completion_equals_generate(server, reference):
    url, _ = server
    for prompt in PROMPTS[:2]:
        response = client(url).completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0)
        assert response.choices[0].text == reference.generate(prompt, max_tokens=24, temperature=0)
        assert response.choices[0].finish_reason == reference.last_stats.finish_reason == "length"
        assert response.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
        assert response.usage.completion_tokens == reference.last_stats.generated_tokens == 24
        assert response.usage.total_tokens == response.usage.prompt_tokens + 24


def test_streamed_completion_equals_generate(server, reference):
    url, _ = server
    stream = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[2], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    expected = reference.generate(PROMPTS[2], max_tokens=30, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len([c for c in chunks if c.choices]) > 5  # it really streamed, piece by piece


def test_token_id_prompt(server, reference):
    url, _ = server
    ids = reference.tokenizer.encode(PROMPTS[3])
    response = client(url).completions.create(model=MODEL_ID, prompt=ids, max_tokens=10, temperature=0)
    assert response.choices[0].text == reference.generate(PROMPTS[3], max_tokens=10, temperature=0)


def test_chat_equals_chat_template_path(server, reference):
    url, _ = server
    messages = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Speak the speech."}]
    expected = reference.chat(messages, max_tokens=20, temperature=0)
    prompt = reference.tokenizer.encode(reference.chat_template.render(messages), add_bos=False)
    answer = client(url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(prompt)
    stream = client(url).chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_stop_strings(server, reference):
    url, _ = server
    full = reference.generate(PROMPTS[0], max_tokens=40, temperature=0)
    stop = full[15:19]
    expected = full[: full.index(stop)]
    assert reference.generate(PROMPTS[0], max_tokens=40, temperature=0, stop=[stop]) == expected
    for stream in (False, True):
        response = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                                  stop=["never appears", stop], stream=stream)
        chunks = list(response) if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_finishes_with_stop(reference):
    """The shipped model never writes <|eot_id|> on its own; make the newline a stop token instead."""
    model = ternlm.load(threads=1)
    newline = model.tokenizer.encode("\n", add_bos=False)[0]
    model.stop_ids = reference.stop_ids | {newline}
    alone = ternlm.load(threads=1)
    alone.stop_ids = model.stop_ids
    expected = alone.chat([{"role": "user", "content": "Hello"}], max_tokens=50, temperature=0)
    assert alone.last_stats.finish_reason == "stop"
    with running_server(model) as (url, _):
        answer = client(url).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}],
                                                     max_tokens=50, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == alone.last_stats.generated_tokens


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_chat_logprobs(server, reference):
    url, _ = server
    messages = [{"role": "user", "content": "Good morrow"}]
    prompt = reference.tokenizer.encode(reference.chat_template.render(messages), add_bos=False)
    generated = list(reference.stream_tokens(prompt, max_tokens=6, temperature=0))
    expected = log_softmax(reference.logits(prompt + generated))[len(prompt) - 1:-1]  # [6, vocab]
    answer = client(url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [reference.tokenizer.decode([t], skip_special_tokens=False) for t in generated]
    for entry, token, row in zip(content, generated, expected):
        assert entry.logprob == pytest.approx(row[token], abs=1e-3)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the best
        best = np.argsort(-row)[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[best].tolist(), abs=1e-3)


def test_completion_logprobs_streamed(server):
    url, _ = server
    chunks = list(client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                                 logprobs=2, stream=True, stream_options={"include_usage": True}))
    entries = [c.choices[0].logprobs for c in chunks if c.choices]
    tokens = [t for e in entries for t in e.tokens]
    assert len(tokens) == chunks[-1].usage.completion_tokens == 8
    offsets = [o for e in entries for o in e.text_offset]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(8)]
    for e in entries:
        for logprob, top in zip(e.token_logprobs, e.top_logprobs):
            assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)


def test_seeded_sampling_is_reproducible(server):
    url, _ = server
    kwargs = dict(model=MODEL_ID, prompt=PROMPTS[4], max_tokens=16, temperature=1.5, top_p=0.95)
    texts = {client(url).completions.create(seed=7, **kwargs).choices[0].text for _ in range(2)}
    streamed = "".join(c.choices[0].text for c in client(url).completions.create(seed=7, stream=True, **kwargs))
    assert len(texts) == 1 and streamed in texts
    others = {client(url).completions.create(seed=s, **kwargs).choices[0].text for s in range(4)}
    assert len(others) > 1


def test_seeded_sampling_equals_the_api_alone_and_in_a_batch(server, reference):
    """Each request's seed gives the tokens the API gives with it, whether the request runs alone or
    stepped together with others sampling with their own settings."""
    url, served = server
    settings = [dict(temperature=1.5, top_p=0.95, seed=1), dict(temperature=1.0, top_k=40, seed=2),
                dict(temperature=2.0, min_p=0.05, repetition_penalty=1.3, seed=3),
                dict(temperature=1.2, top_k=200, top_p=0.9, min_p=0.02, seed=4)]
    expected = [reference.generate(PROMPTS[i], max_tokens=20, **s) for i, s in enumerate(settings)]
    assert len(set(expected)) == len(expected)

    def request(i: int) -> str:
        s = settings[i]
        standard = {k: s[k] for k in ("temperature", "top_p", "seed") if k in s}  # the rest: the model's defaults
        extra = {k: s[k] for k in ("top_k", "min_p", "repetition_penalty") if k in s}
        return client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=20, extra_body=extra,
                                              **standard).choices[0].text

    assert [request(i) for i in range(len(settings))] == expected  # alone
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, request(i))) for i in range(len(settings))]
    before = metrics(url)
    with served.model.engine.held():  # all arrive before the first step: they run together
        for t in threads:
            t.start()
        wait_until(lambda: metrics(url)["ternlm_queue_length"] + metrics(url)["ternlm_active_sequences"]
                   == len(settings), "the requests to arrive")
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(len(settings))] == expected
    after = metrics(url)
    assert after["ternlm_batch_size_sum"] - before["ternlm_batch_size_sum"] > after["ternlm_batch_size_count"] - before["ternlm_batch_size_count"]


# ---- continuous batching ----

def test_concurrent_streams_equal_single_runs(server, reference):
    """Six streams stepped together give each one's greedy text alone; the steps really were batched."""
    url, served = server
    expected, expected_tokens = {}, 0
    for i, prompt in enumerate(PROMPTS):
        if i % 2:
            expected[i] = reference.chat([{"role": "user", "content": prompt}], max_tokens=20 + i, temperature=0)
        else:
            expected[i] = reference.generate(prompt, max_tokens=20 + i, temperature=0)
        expected_tokens += reference.last_stats.generated_tokens
    results: dict[int, str] = {}

    def run(i: int) -> None:
        if i % 2:
            stream = client(url).chat.completions.create(model=MODEL_ID, max_tokens=20 + i, temperature=0, stream=True,
                                                         messages=[{"role": "user", "content": PROMPTS[i]}])
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        else:
            stream = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=20 + i,
                                                    temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)

    def all_arrived():
        now = metrics(url)
        return now["ternlm_queue_length"] + now["ternlm_active_sequences"] == len(PROMPTS)

    before = metrics(url)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    with served.model.engine.held():  # the first requests to arrive wait in their first step; the others queue
        for t in threads:
            t.start()
        wait_until(all_arrived, "the requests to arrive")
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    after = metrics(url)
    steps = after["ternlm_batch_size_count"] - before["ternlm_batch_size_count"]
    small_steps = after['ternlm_batch_size_bucket{le="4.0"}'] - before['ternlm_batch_size_bucket{le="4.0"}']
    assert steps - small_steps >= 15  # five or six sequences in one step for most of the run
    assert after["ternlm_generated_tokens_total"] - before["ternlm_generated_tokens_total"] == expected_tokens


def test_disconnected_stream_frees_its_slot(server):
    url, served = server
    before = metrics(url)
    body = {"model": MODEL_ID, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
    with served.model.engine.held(after_steps=1):  # the prompt and the first token, then wait
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data: "))  # the first token
        # cancelled, or already dropped if the scheduler was between steps
        wait_until(lambda: all(s.cancelled for s in served.scheduler.running), "the server to notice the disconnect")
    wait_until(lambda: metrics(url)["ternlm_active_sequences"] == 0, "the slot to be freed")
    after = metrics(url)
    assert after['ternlm_requests_total{finish_reason="cancelled"}'] - \
        before.get('ternlm_requests_total{finish_reason="cancelled"}', 0) == 1
    # the first token, and perhaps one more if the next step was already under way when the client left
    assert after["ternlm_generated_tokens_total"] - before["ternlm_generated_tokens_total"] in (1, 2)
    assert served.scheduler.kv_bytes_in_use == 0


def test_saturated_server_answers_429_and_recovers(reference):
    with running_server(max_batch=1, max_waiting=1) as (url, served):
        results = {}

        def run(i):
            results[i] = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=8,
                                                        temperature=0).choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        with served.model.engine.held():
            threads[0].start()
            wait_until(lambda: metrics(url)["ternlm_active_sequences"] == 1, "the first request to run")
            threads[1].start()
            wait_until(lambda: metrics(url)["ternlm_queue_length"] == 1, "the second request to wait")
            with pytest.raises(openai.RateLimitError) as refused:
                client(url).completions.create(model=MODEL_ID, prompt="x", max_tokens=8)
            assert refused.value.status_code == 429
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["code"] == "queue_full"
        for t in threads:
            t.join(timeout=60)
        assert results == {i: reference.generate(PROMPTS[i], max_tokens=8, temperature=0) for i in range(2)}


def test_requests_beyond_the_limit_get_a_json_503(monkeypatch):
    """Requests the scheduler has not queued yet count too: here bodies still arriving. Past
    --max-batch + --max-queue + EXTRA_REQUESTS of them the server answers 503 in OpenAI's shape, not
    uvicorn's plain text, still answers /health, and serves again once they are gone."""
    import ternlm.server.app as app_module

    monkeypatch.setattr(app_module, "EXTRA_REQUESTS", 0)
    page = "http://page.example"
    with running_server(max_batch=1, max_waiting=1, cors_origins=[page]) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        trickling = []
        for _ in range(2):  # the limit: 1 + 1 + 0
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\": ")
            trickling.append(sock)
        try:
            wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 503, "the limit to be reached")
            refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 1},
                                 headers={"Origin": page})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["access-control-allow-origin"] == page  # a browser page can read why
            assert refused.json()["error"]["code"] == "server_overloaded"
            preflight = httpx.options(f"{url}/v1/completions", headers={
                "Origin": page, "Access-Control-Request-Method": "POST"})
            assert preflight.status_code == 200
            assert httpx.get(f"{url}/health").status_code == 200
        finally:
            for sock in trickling:
                sock.close()
        wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 200, "the server to serve again")


def test_request_timeout_ends_running_requests_and_refuses_waiting_ones(reference):
    timeout = 0.5
    with running_server(max_batch=1, max_waiting=4, request_timeout=timeout) as (url, served):
        results = {}

        def run(i):
            try:
                results[i] = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=100,
                                                            temperature=0)
            except openai.APIStatusError as e:
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        with served.model.engine.held(after_steps=2):  # the first request's prompt and first token, then wait
            threads[0].start()
            wait_until(lambda: metrics(url)["ternlm_active_sequences"] == 1, "the first request to run")
            threads[1].start()
            wait_until(lambda: metrics(url)["ternlm_queue_length"] == 1, "the second request to wait")
            started = time.monotonic()
            wait_until(lambda: time.monotonic() - started > 2 * timeout, "both requests to pass the timeout")
        for t in threads:
            t.join(timeout=60)
        samples = metrics(url)
    ended = results[0]
    assert ended.choices[0].finish_reason == "length" and ended.usage.completion_tokens < 100
    assert ended.choices[0].text == reference.generate(PROMPTS[0], max_tokens=ended.usage.completion_tokens,
                                                       temperature=0)
    assert results[1].status_code == 503 and "timeout" in results[1].message
    assert samples['ternlm_requests_total{finish_reason="timeout"}'] == 2
    assert samples["ternlm_active_sequences"] == samples["ternlm_queue_length"] == samples["ternlm_kv_cache_bytes"] == 0


def test_stopped_scheduler_answers_503_at_once():
    with running_server() as (url, served):
        served.scheduler.stop()
        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_unavailable"
        assert httpx.get(f"{url}/health").status_code == 503


def test_kv_budget_makes_requests_wait_or_refuses_them(reference):
    model = ternlm.load(threads=1)
    per_position = model.engine.new_block_pool(1).block_bytes // KV_BLOCK
    with running_server(model, kv_budget_bytes=64 * per_position) as (url, _):
        with pytest.raises(openai.BadRequestError) as refused:
            client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=100)
        assert refused.value.body["code"] == "kv_cache_budget_exceeded"
        results = {}

        def run(i):  # each needs 8-9 prompt + 40 positions, 4 blocks of 16: two do not fit together
            results[i] = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=40,
                                                        temperature=0).choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        after = metrics(url)
    assert results == {i: reference.generate(PROMPTS[i], max_tokens=40, temperature=0) for i in range(3)}
    assert after['ternlm_batch_size_bucket{le="1.0"}'] == after["ternlm_batch_size_count"]  # one at a time


# ---- bad requests ----

BAD_REQUESTS = [
    # (what, path, body, status, code or param that the error names)
    ("malformed JSON", "completions", '{"model": "ternlm-default", "prompt": ', 400, "invalid_json"),
    ("body not an object", "completions", "[1, 2]", 400, "invalid_value"),
    ("wrong type", "completions", {"prompt": 5}, 400, "prompt"),
    ("number as a string", "completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("negative max_tokens", "completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("huge max_tokens", "completions", {"prompt": "x", "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ("prompt over the context", "completions", {"prompt": "question " * 400}, 400, "context_length_exceeded"),
    ("token id outside the vocabulary", "completions", {"prompt": [0, 99999]}, 400, "prompt"),
    ("two prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n above 1", "completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("temperature out of range", "completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("lone surrogate", "completions", '{"model": "ternlm-default", "prompt": "a\\ud800"}', 400, "prompt"),
    ("unknown model", "completions", {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
    ("no messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("unknown role", "chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("top_logprobs without logprobs", "chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("conversation over the context", "chat/completions",
     {"messages": [{"role": "user", "content": "question " * 400}]}, 400, "context_length_exceeded"),
    ("body over 1 MiB", "completions", {"prompt": "x" * (2 << 20)}, 413, "request_too_large"),
    ("no such endpoint", "embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("what, path, body, status, named", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, reference, what, path, body, status, named):
    url, _ = server
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL_ID, **body})
    response = httpx.post(f"{url}/v1/{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert named in (error["code"], error["param"])
    ok = client(url).completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert ok.choices[0].text == reference.generate(PROMPTS[0], max_tokens=4, temperature=0)


def test_openai_client_raises_its_own_errors(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).chat.completions.create(model=MODEL_ID, max_tokens=1000,
                                            messages=[{"role": "user", "content": "x"}])


def test_openapi_document_promises_what_the_server_answers(server):
    url, _ = server
    document = httpx.get(f"{url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = document["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429", "503"} <= set(responses) and "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_api_key():
    with running_server(api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError) as refused:
            client(url, api_key="wrong").models.list()
        assert refused.value.body["code"] == "invalid_api_key"
        missing = httpx.get(f"{url}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/completions", content="{bad").status_code == 401  # before anything else
        assert client(url, api_key="sekret").completions.create(model=MODEL_ID, prompt="x", max_tokens=2).usage
        assert httpx.get(f"{url}/health").status_code == 200
        document = httpx.get(f"{url}/openapi.json").json()
        assert "401" in document["paths"]["/v1/models"]["get"]["responses"]


def test_metrics_are_prometheus_text(reference):
    with running_server(ternlm.load(threads=1)) as (url, _):
        usage = [client(url).completions.create(model=MODEL_ID, prompt=p, max_tokens=5 + i, temperature=0).usage
                 for i, p in enumerate(PROMPTS[:3])]
        httpx.post(f"{url}/v1/completions", content="{")
        samples = metrics(url)
    assert samples["ternlm_generated_tokens_total"] == sum(u.completion_tokens for u in usage) == 5 + 6 + 7
    assert samples["ternlm_prompt_tokens_total"] == sum(u.prompt_tokens for u in usage)
    assert samples['ternlm_requests_total{finish_reason="length"}'] == 3
    assert samples["ternlm_time_to_first_token_seconds_count"] == 3
    assert samples['ternlm_http_responses_total{path="/v1/completions",status="200"}'] == 3
    assert samples['ternlm_http_responses_total{path="/v1/completions",status="400"}'] == 1
    for name in ("ternlm_queue_length", "ternlm_active_sequences", "ternlm_batch_size_count",
                 "ternlm_generated_tokens_per_second", "ternlm_kv_cache_bytes", "ternlm_kv_cache_budget_bytes"):
        assert name in samples
    assert samples["ternlm_generated_tokens_per_second"] > 0


# ---- the command line ----

def test_serve_help_explains_every_flag():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    for action in serve._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = serve.format_help()
    for flag in ("--host", "--port", "--api-key", "TERNLM_API_KEY", "--max-batch", "--ctx", "--max-queue",
                 "--kv-memory", "--prefill-chunk", "--request-timeout", "--cors-origin", "127.0.0.1"):
        assert flag in text


def test_cli_serve_takes_the_key_from_the_environment():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "TERNLM_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "ternlm.cli", "serve", "--port", str(port), "-t", "1"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                return False

        wait_until(up, "ternlm serve to answer")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert client(url, api_key="from-env").models.list().data[0].id == MODEL_ID
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- the chat page, in a real browser ----

def chromium_path() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.mark.slow
def test_chat_page_streams_keeps_the_conversation_and_stops(reference):
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium_path()
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it with apt-get")
        pytest.skip("no chromium on PATH: apt-get install chromium (Debian's; playwright drives it)")
    with running_server() as (url, served), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#model")).to_have_text(MODEL_ID)
        page.locator("summary").click()
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "30")
        history = []
        for turn, question in enumerate(["Who art thou?", "Speak again."]):
            page.fill("#message", question)
            page.keyboard.press("Enter")
            answer = page.locator(".message.assistant").nth(turn)
            expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
            history.append({"role": "user", "content": question})
            expected = reference.chat(history, max_tokens=30, temperature=0)
            assert answer.text_content() == expected
            history.append({"role": "assistant", "content": expected})
        expect(page.locator("#status")).to_contain_text("tokens/s")

        # A question that, with the history and 200 tokens of answer, outgrows the 256-token context:
        # the page drops the oldest turns until the server takes it, and says so in one line.
        page.fill("#max-tokens", "200")
        page.fill("#message", "And once more.")
        page.keyboard.press("Enter")
        answer = page.locator(".message.assistant").nth(2)
        expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
        kept = history + [{"role": "user", "content": "And once more."}]
        while len(reference.chat_prompt_ids(kept)) + 200 > reference.n_ctx:
            kept = kept[2:]  # the oldest question and its answer
        assert len(kept) < len(history) + 1
        expect(page.locator(".message.notice")).to_contain_text("outgrew the model's context")
        assert answer.text_content() == reference.chat(kept, max_tokens=200, temperature=0)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)

        page.click("#new-chat")
        expect(page.locator(".message")).to_have_count(0)
        with served.model.engine.held():  # the answer's first step waits while the test clicks Stop
            page.fill("#message", "Tell me a long tale.")
            page.keyboard.press("Enter")
            wait_until(lambda: metrics(url)["ternlm_active_sequences"] == 1, "the question to reach the scheduler")
            page.click("#stop")
            expect(page.locator(".message.assistant .stopped")).to_have_text(" [stopped]")
            wait_until(lambda: all(s.cancelled for s in served.scheduler.running), "the server to notice the stop")
        wait_until(lambda: metrics(url).get('ternlm_requests_total{finish_reason="cancelled"}') == 1,
                   "the stopped request to be dropped")
        browser.close()
