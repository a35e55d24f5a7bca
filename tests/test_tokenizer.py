"""The real LLaMA-3 tokenizer (the one 2B4T uses) encodes exactly as transformers does."""

from __future__ import annotations

import pytest

from ternlm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # transformers

TEXTS = [
    "To be, or not to be, that is the question.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }\t// tabs\tand  spaces",
    "emoji: 😀🎉👩‍👩‍👧‍👦 ✔︎ 🇺🇳",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "whitespace runs:     four\n\n\n\nnewlines   \t\t  mixed  \r\n end   ",
    "numbers 1234567890 3.14159 1,000,000 and 'quotes' \"double\" it's they'll we'd",
    "special tokens inline: <|begin_of_text|>hello<|eot_id|> world",
    "Ünïcödé àccents — em dash … ellipsis «guillemets» ß",
    " leading space and trailing space ",
    "",
]


@pytest.fixture(scope="module")
def both(llama3_dir):
    from transformers import AutoTokenizer

    return Tokenizer.from_directory(llama3_dir), AutoTokenizer.from_pretrained(str(llama3_dir))


def test_vocabulary_is_llama3(both):
    ours, _ = both
    assert ours.vocab_size == 128256
    assert ours.bos_id == 128000
    assert ours.token_to_id("<|eot_id|>") == 128009


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(both, text):
    ours, theirs = both
    assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_bos=True) == theirs.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_and_stream_round_trip(both, text):
    ours, theirs = both
    ids = ours.encode(text, add_bos=False)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    stream = ours.decode_stream()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == ours.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters never split
