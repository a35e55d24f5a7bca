"""Prompt caching: the paged KV cache (kept, extended, truncated, shared) and the caches built on it."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import httpx

import numpy as np
import pytest

import ternlm
from ternlm import _core
from ternlm.reference import KV_BLOCK
from conftest import random_bitnet, write_checkpoint
from test_server import MODEL_ID, GatedEngine, client, metrics, running_server, wait_until

PROMPT = [int(t) for t in np.random.default_rng(0).integers(2, 300, 56)]
PREFIXES = [1, KV_BLOCK - 1, KV_BLOCK, KV_BLOCK + 1, 2 * KV_BLOCK, 45]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_json):
    return write_checkpoint(random_bitnet(seed=21), tmp_path_factory.mktemp("cached"), tiny_tokenizer_json)


ENGINES = [("native", "f16"), ("native", "f32"), ("reference", "f16")]  # the reference keeps float32 whatever asked


def load_engine(model_dir, backend, kv_cache):
    return ternlm.load(model_dir, backend=backend, **({"kv_cache": kv_cache} if backend == "native" else {})).engine


def test_block_size_is_the_cores():
    assert KV_BLOCK == _core.KV_BLOCK


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_logits_after_a_shared_prefix_equal_recomputing_bit_for_bit(model_dir, backend, kv_cache):
    """A sequence that takes another's first k positions (its blocks, not a copy) and computes the
    rest gives exactly the logits of computing the whole prompt, at block boundaries and between;
    the sequence it shares with keeps its own keys and values (writes copy a shared block first)."""
    engine = load_engine(model_dir, backend, kv_cache)
    n_ctx = 64
    recomputed = engine.forward(engine.new_cache(n_ctx), PROMPT, 0)[-1]
    pool = engine.new_block_pool(16)
    for k in PREFIXES:
        first = engine.new_cache(n_ctx, pool)
        engine.forward(first, PROMPT[:k], 0)
        second = engine.new_cache(n_ctx, pool)
        second.share_prefix(first, k)
        assert second.blocks == first.blocks[:len(second.blocks)]
        assert np.array_equal(engine.forward(second, PROMPT[k:], k)[-1], recomputed), k
        other = [t + 1 for t in PROMPT[k:]]  # the first sequence goes on differently
        alone = engine.forward(engine.new_cache(n_ctx), PROMPT[:k] + other, 0)[-1]
        assert np.array_equal(engine.forward(first, other, k)[-1], alone), k
        next_step = engine.forward(engine.new_cache(n_ctx), PROMPT + [7], 0)[-1]
        assert np.array_equal(engine.forward(second, [7], len(PROMPT))[-1], next_step), k
        del first, second
        assert pool.free_blocks == pool.capacity


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_truncated_cache_goes_on_as_recomputing(model_dir, backend, kv_cache):
    engine = load_engine(model_dir, backend, kv_cache)
    cache = engine.new_cache(64)
    engine.forward(cache, PROMPT, 0)
    for k in reversed(PREFIXES):
        cache.truncate(k)
        assert len(cache.blocks) == -(-k // KV_BLOCK)
        suffix = [t + 3 for t in PROMPT[k:k + 5]]
        expected = engine.forward(engine.new_cache(64), PROMPT[:k] + suffix, 0)[-1]
        assert np.array_equal(engine.forward(cache, suffix, k)[-1], expected), k
        cache.truncate(k)  # the next round writes over the suffix again


@pytest.mark.parametrize("backend,kv_cache", ENGINES)
def test_block_pool_counts_references(model_dir, backend, kv_cache):
    engine = load_engine(model_dir, backend, kv_cache)
    pool = engine.new_block_pool(4)
    a, b = engine.new_cache(64, pool), engine.new_cache(64, pool)
    engine.forward(a, PROMPT[:2 * KV_BLOCK], 0)
    b.share_prefix(a, 2 * KV_BLOCK)
    assert pool.free_blocks == 2 and [pool.references(x) for x in a.blocks] == [2, 2]
    engine.forward(b, PROMPT[2 * KV_BLOCK:2 * KV_BLOCK + 1], 2 * KV_BLOCK)  # a third block, b's own
    assert pool.free_blocks == 1
    engine.forward(b, [5], KV_BLOCK)  # writing into a shared block copies it
    assert pool.free_blocks == 0 and pool.references(a.blocks[1]) == 1
    with pytest.raises(RuntimeError, match="KV cache is full"):
        engine.forward(a, PROMPT[2 * KV_BLOCK:2 * KV_BLOCK + 1], 2 * KV_BLOCK)
    b.truncate(0)
    assert pool.free_blocks == 2
    with pytest.raises(ValueError, match="more KV blocks"):
        engine.new_cache(KV_BLOCK, pool).assign(a.blocks)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("log2_block", [0, 1, 4])
def test_f16_attention_in_blocks_equals_contiguous(kernel, log2_block):
    """The kernels take positions in order whatever the blocks: bit-identical to one block."""
    rng = np.random.default_rng(log2_block)
    q = rng.standard_normal((4, 72)).astype(np.float32)
    keys = rng.standard_normal((37, 160)).astype(np.float16).view(np.uint16)
    values = rng.standard_normal((37, 160)).astype(np.float16).view(np.uint16)
    whole = _core.kernels.f16_attention(q, keys, values, 80, 0.1, kernel)
    assert np.array_equal(_core.kernels.f16_attention(q, keys, values, 80, 0.1, kernel, log2_block), whole)


# ---- the Python API ----

@pytest.mark.parametrize("backend", ["native", "reference"])
def test_api_reuses_the_longest_cached_prefix(model_dir, backend):
    """Greedy texts and logits are those of a model without a prompt cache; last_stats says how many
    prompt tokens came from the cache (whole blocks of the longest common prefix, never the last)."""
    cached = ternlm.load(model_dir, backend=backend)
    plain = ternlm.load(model_dir, backend=backend, prompt_cache_mb=0)
    assert plain.prompt_cache is None
    cached.stop_ids = plain.stop_ids = set()
    ids = PROMPT[:42]
    first = list(cached.stream_tokens(ids, max_tokens=6))
    assert first == list(plain.stream_tokens(ids, max_tokens=6))
    assert (cached.last_stats.prompt_tokens, cached.last_stats.cached_prompt_tokens) == (42, 0)
    # the answer's tokens were computed too, but for the last one (48 positions, 47 computed):
    # a prompt that goes on from them reuses 2 whole blocks
    longer = ids + first + [5, 6, 7]
    assert list(cached.stream_tokens(longer, max_tokens=6)) == list(plain.stream_tokens(longer, max_tokens=6))
    assert cached.last_stats.cached_prompt_tokens == 2 * KV_BLOCK
    assert list(cached.stream_tokens(longer + first, max_tokens=6)) == list(plain.stream_tokens(longer + first, max_tokens=6))
    assert cached.last_stats.cached_prompt_tokens == 3 * KV_BLOCK
    assert list(cached.stream_tokens(ids, max_tokens=6)) == first
    assert cached.last_stats.cached_prompt_tokens == 2 * KV_BLOCK
    assert np.array_equal(cached.logits(ids[:20]), plain.logits(ids[:20]))
    cached.reset_prompt_cache()
    list(cached.stream_tokens(ids, max_tokens=1))
    assert cached.last_stats.cached_prompt_tokens == 0


def test_prompt_cache_evicts_least_recently_used_within_its_budget(model_dir):
    model = ternlm.load(model_dir, prompt_cache_mb=1e-9)
    block_bytes = model.prompt_cache.pool.block_bytes
    model = ternlm.load(model_dir, prompt_cache_mb=4 * block_bytes / 2**20)  # room for 4 blocks
    cache = model.prompt_cache
    a, b = PROMPT[:33], [t + 1 for t in PROMPT[:33]]  # 2 whole blocks each
    model.logits(a)
    model.logits(b)
    assert cache.blocks == 4 and cache.nbytes == 4 * block_bytes
    model.logits(a)  # a is now the most recently used
    model.logits([t + 2 for t in PROMPT[:17]])  # one more block: b's last goes
    assert cache.blocks == 4 and cache.stats.evictions == 1
    assert len(cache.lookup(a)) == 2 and len(cache.lookup(b)) == 1
    assert cache.pool.free_blocks == cache.pool.capacity - 4  # nothing else is held


# ---- chat ----

def run_cli(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True,
                          input=input_text, timeout=120)


def test_cli_chat_computes_only_new_tokens_and_answers_as_without_cache(model_dir):
    """Turn 2 takes turn 1 from the prompt cache (--verbose says how much), and the answers are the
    API's without a cache; /reset empties the cache."""
    result = run_cli("chat", "-m", str(model_dir), "-n", "6", "--verbose",
                     input_text="To be, or not\nThe slings and arrows\n/reset\nTo be, or not\n/exit\n")
    assert result.returncode == 0, result.stderr
    cached = [int(n) for n in re.findall(r"\((\d+) cached, \d+ new\)", result.stderr)]
    assert len(cached) == 3 and cached[0] == 0 and cached[1] >= KV_BLOCK and cached[2] == 0, result.stderr
    assert "first token after" in result.stderr
    plain = ternlm.load(model_dir, prompt_cache_mb=0)
    messages = [{"role": "user", "content": "To be, or not"}]
    first = plain.chat(messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "The slings and arrows"}]
    assert result.stdout == f"> {first}\n> {plain.chat(messages, max_tokens=6)}\n> > {first}\n> "


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(model_dir):
    model = ternlm.load(model_dir, n_ctx=64)
    model.stop_ids = set()
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"To be, or not {i}"} for i in range(9)]
    ids, dropped = model.fit_chat([system] + turns, max_tokens=8)
    assert dropped % 2 == 0 and dropped > 0  # whole turns: the kept part starts with the user
    assert ids == model.chat_prompt_ids([system] + turns[dropped:]) and len(ids) + 8 <= 64
    assert len(model.chat_prompt_ids([system] + turns[dropped - 2:])) + 8 > 64  # no more dropped than needed
    with pytest.warns(UserWarning, match=f"oldest {dropped} messages"):
        answer = model.chat([system] + turns, max_tokens=8)
    assert answer == model.chat([system] + turns[dropped:], max_tokens=8)
    with pytest.raises(ValueError, match="context"):  # the last message alone is too long
        model.chat([{"role": "user", "content": "To be, or not " * 40}], max_tokens=8)


def test_cli_chat_goes_on_past_the_context(model_dir):
    """ternlm chat on a small context: the default answer leaves room, and when the conversation
    outgrows the context its oldest turns go, with a notice, instead of an error."""
    lines = "".join(f"To be, or not to be, that is the question {i}\n" for i in range(6))
    result = run_cli("chat", "-m", str(model_dir), "--ctx", "96", input_text=lines + "/exit\n")
    assert result.returncode == 0, result.stderr
    assert "outgrew the context of 96 tokens" in result.stderr
    assert "error" not in result.stderr and "Warning" not in result.stderr  # one plain line, not a Python warning
    assert result.stdout.count("\n") == 6


# ---- the server ----

LONG_PROMPT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
               "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
               "and by opposing end them.")


@pytest.fixture(scope="module")
def uncached():
    """The independent path: the shipped model, one sequence at a time, without a prompt cache."""
    return ternlm.load(threads=1, prompt_cache_mb=0)


def test_server_reuses_prompts_across_requests(uncached):
    """The second request with a known prefix computes only the rest (usage and /metrics say how
    much came from the cache) and answers as the model without a cache does."""
    with running_server(ternlm.load(threads=1)) as (url, served):
        api = client(url)
        first = api.completions.create(model=MODEL_ID, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
        second = api.completions.create(model=MODEL_ID, prompt=LONG_PROMPT + " Ay, there's the rub",
                                        max_tokens=8, temperature=0)
        chat = api.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": LONG_PROMPT}],
                                           max_tokens=8, temperature=0)
        chat_again = api.chat.completions.create(model=MODEL_ID, max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": chat.choices[0].message.content},
            {"role": "user", "content": "Ay, there's the rub"}])
        samples = metrics(url)
    assert first.choices[0].text == uncached.generate(LONG_PROMPT, max_tokens=8, temperature=0)
    assert second.choices[0].text == uncached.generate(LONG_PROMPT + " Ay, there's the rub", max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    prompt_ids = uncached.prompt_ids(LONG_PROMPT)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == len(prompt_ids) // KV_BLOCK * KV_BLOCK  # the common prompt's whole blocks
    assert chat_again.usage.prompt_tokens_details.cached_tokens >= KV_BLOCK * (len(prompt_ids) // KV_BLOCK)
    assert chat_again.choices[0].message.content == uncached.chat([
        {"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": chat.choices[0].message.content},
        {"role": "user", "content": "Ay, there's the rub"}], max_tokens=8, temperature=0)
    assert samples["ternlm_prompt_cache_hits_total"] == 2
    assert samples["ternlm_prompt_cache_cached_tokens_total"] == cached + chat_again.usage.prompt_tokens_details.cached_tokens
    assert samples["ternlm_prompt_cache_bytes"] > 0 and samples["ternlm_kv_cache_bytes"] == 0


def test_concurrent_streams_hold_one_copy_of_their_common_prefix(uncached):
    """Four streams with a long common prompt: the first computes it, the others start from its
    blocks as soon as they are computed, and the server holds them once."""
    model = ternlm.load(threads=1)
    model.engine = GatedEngine(model.engine)
    prompts = [LONG_PROMPT + f" {name}:" for name in ("ROMEO", "JULIET", "HAMLET", "OPHELIA")]
    with running_server(model, max_batch=4, prefill_chunk=16) as (url, served):
        results = {}

        def run(i):
            results[i] = client(url).completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=100,
                                                        temperature=0)

        scheduler = served.scheduler
        with model.engine.held():
            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            wait_until(lambda: len(scheduler.running) + len(scheduler.waiting) == 4, "the four requests")
        with model.engine.held(after_steps=30):  # every prompt prefilled, no answer finished
            wait_until(lambda: len(served.scheduler.running) == 4 and all(
                s.prefilled == len(s.prompt) for s in served.scheduler.running), "every prompt to be prefilled")
            held = [set(s.cache.blocks) for s in scheduler.running]
            in_use = scheduler.kv_bytes_in_use
        for t in threads:
            t.join(timeout=60)
    shared = set.intersection(*held)
    prefix_blocks = len(uncached.prompt_ids(LONG_PROMPT)) // KV_BLOCK
    assert len(shared) >= prefix_blocks - 1  # all but the chunk two prompts computed in the same step
    assert in_use == len(set.union(*held)) * scheduler.block_bytes < sum(map(len, held)) * scheduler.block_bytes
    for i in range(4):
        assert results[i].choices[0].text == uncached.generate(prompts[i], max_tokens=100, temperature=0)
    assert sum(results[i].usage.prompt_tokens_details.cached_tokens for i in range(4)) >= 3 * (prefix_blocks - 1) * KV_BLOCK


def test_a_burst_is_admitted_up_to_max_batch_plus_max_queue():
    """40 requests at once to a server with 4 slots and a queue of 8: 12 are answered, 28 refused —
    those about to take a free slot do not count as waiting."""
    model = ternlm.load(threads=1)
    model.engine = GatedEngine(model.engine)
    with running_server(model, max_batch=4, max_waiting=8) as (url, served):
        statuses = []

        def run(i):
            body = {"model": MODEL_ID, "prompt": f"To be {i}", "max_tokens": 2}
            statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)

        with model.engine.held():
            threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
            for t in threads:
                t.start()
            wait_until(lambda: statuses.count(429) == 28, "the refusals")
        for t in threads:
            t.join(timeout=60)
    assert sorted(statuses) == [200] * 12 + [429] * 28


def test_a_client_that_leaves_mid_prefill_leaves_only_whole_computed_blocks(uncached):
    model = ternlm.load(threads=1)
    model.engine = GatedEngine(model.engine)
    prompt = LONG_PROMPT * 3
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    with running_server(model, prefill_chunk=24) as (url, served):
        with model.engine.held(after_steps=2):  # 48 of the prompt's tokens, then the client leaves
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                wait_until(lambda: served.scheduler.running and served.scheduler.running[0].prefilled == 48,
                           "two prompt chunks")
            wait_until(lambda: all(s.cancelled for s in served.scheduler.running), "the server to notice")
        wait_until(lambda: not served.scheduler.running, "the slot to be freed")
        # the chunks computed, and the one under way when the client left if the step had begun
        kept = served.scheduler.prompt_cache.blocks
        assert kept in (3, 4)
        again = client(url).completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == kept * KV_BLOCK
    assert again.choices[0].text == uncached.generate(prompt, max_tokens=4, temperature=0)


# ---- ternlm generate --prompt-cache FILE ----

def test_prompt_cache_file_reused_and_bad_files_recomputed(model_dir, tmp_path):
    """The second run loads the prompt's blocks (and prints what the first printed); a file from
    another model, options or prompt, truncated or not safetensors at all, is one warning line,
    then the prompt is computed and the file rewritten."""
    file = tmp_path / "prompt.kv"
    prompt = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
    args = ("generate", prompt, "-m", str(model_dir), "-n", "6", "--verbose", "--prompt-cache", str(file))
    first = run_cli(*args)
    assert first.returncode == 0 and file.exists(), first.stderr
    assert "(0 cached" in first.stderr
    second = run_cli(*args)
    assert second.returncode == 0 and second.stdout == first.stdout, second.stderr
    assert "warning" not in second.stderr and "(0 cached" not in second.stderr
    good = file.read_bytes()
    other_options = run_cli(*args, "--kv-cache", "f32")
    assert "another model or other load options" in other_options.stderr and other_options.stdout == first.stdout
    file.write_bytes(good)
    other_prompt = run_cli("generate", "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar",
                           *args[2:])
    assert "another prompt" in other_prompt.stderr
    for broken in (good[: len(good) // 2], b"not safetensors", b""):
        file.write_bytes(broken)
        result = run_cli(*args)
        assert result.returncode == 0 and result.stdout == first.stdout, result.stderr
        assert len([line for line in result.stderr.splitlines() if "warning" in line]) == 1
        assert "Traceback" not in result.stderr
        assert run_cli(*args).stderr.count("warning") == 0  # rewritten
