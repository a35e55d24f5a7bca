"""Generation, chat, sampling and the CLI on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ternlm
from conftest import random_bitnet, write_checkpoint
from ternlm.chat import BITNET_2B4T_TEMPLATE, ChatTemplate
from ternlm.generate import stream_text
from ternlm.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_json):
    directory = write_checkpoint(random_bitnet(seed=21), tmp_path_factory.mktemp("gen"), tiny_tokenizer_json)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return ternlm.load(model_dir)


def test_2b4t_template_renders_the_official_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = ChatTemplate(None, bos_token="<|begin_of_text|>").render(messages)
    assert text == ("<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi!<|eot_id|>"
                    "Assistant: Hello.<|eot_id|>User: Bye<|eot_id|>Assistant: ")
    assert ChatTemplate(BITNET_2B4T_TEMPLATE).render(messages[:1], add_generation_prompt=False).endswith("<|eot_id|>")


def test_templates_run_sandboxed():
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template failed"):
        ChatTemplate(hostile).render([{"role": "user", "content": "x"}])


def test_stop_ids_cover_config_generation_config_and_eot(model):
    # 1 <|end_of_text|> from config.json, 5 from generation_config.json, 2 <|eot_id|> from the vocabulary
    assert model.stop_ids == {1, 2, 5}


def test_chat_prompt_tokens(model):
    ids = model.tokenizer.encode(model.chat_template.render([{"role": "user", "content": "To be"}]), add_bos=False)
    assert ids[0] == model.tokenizer.bos_id
    assert model.tokenizer.token_to_id("<|eot_id|>") in ids


def test_generate_is_greedy_and_deterministic(model):
    a = model.generate("To be, or not", max_tokens=12)
    assert a == model.generate("To be, or not", max_tokens=12)
    assert model.last_stats.generated_tokens <= 12
    assert "".join(model.stream("To be, or not", max_tokens=12)) == a


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    first = model.generate("The slings", seed=7, **kwargs)
    assert first == model.generate("The slings", seed=7, **kwargs)
    kwargs["temperature"] = 100.0  # a random tiny model is very peaked
    others = {model.generate("The slings", seed=s, **kwargs) for s in range(8)}
    assert len(others) > 1


def test_chat_returns_text(model):
    answer = model.chat([{"role": "user", "content": "Whether 'tis nobler"}], max_tokens=8)
    assert isinstance(answer, str)


def test_prompt_longer_than_context_is_a_clear_error(model):
    long_prompt = " ".join(["question"] * 400)
    with pytest.raises(ternlm.ContextOverflowError, match="context"):
        model.generate(long_prompt, max_tokens=4)


def test_generation_stops_at_the_context_end(model_dir):
    small = ternlm.load(model_dir, n_ctx=20)
    ids = small.tokenizer.encode("To be, or not to be")
    small.stop_ids = set()
    generated = list(small.stream_tokens(ids, max_tokens=100))
    assert len(ids) + len(generated) == 20
    assert small.last_stats.finish_reason == "length"


def test_invalid_sampling_parameters(model):
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=0.0)


def test_stop_strings_cut_text_even_across_tokens(model):
    class FakeTokenizer:
        def decode_stream(self):
            class Stream:
                def step(self, token):
                    return ["Hel", "lo wo", "rld", "!"][token]
            return Stream()

    stats = ternlm.GenerationStats()
    tokens = iter(range(4))
    out = list(stream_text((t for t in tokens), FakeTokenizer(), ["o wor"], stats))
    assert "".join(out) == "Hell"
    assert stats.finish_reason == "stop"
    out = list(stream_text((t for t in range(4)), FakeTokenizer(), ["xyz"], stats))
    assert "".join(out) == "Hello world!"


def test_sampling_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = lambda **kw: {sample(logits, SamplingParams(temperature=1.0, **kw), rng, []) for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}
    assert draws(min_p=0.5) == {0, 1}
    assert draws() == {0, 1, 2, 3}
    penalised = sample(np.array([2.0, 1.9], dtype=np.float32), SamplingParams(repetition_penalty=1.5), rng, [0])
    assert penalised == 1


def test_extreme_sampling_parameters_stay_finite():
    """The smallest positive temperature and penalty the API accepts (found by tests/test_api_schema.py)
    once made logits infinite and probabilities NaN: now they are greedy over the penalised logits."""
    logits = np.array([3.0, 2.0, -1.0, 2.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    for penalty, history, greedy in [(1.0, [], 0), (5e-324, [3], 3), (10.0, [0], 3)]:
        params = SamplingParams(temperature=5e-324, repetition_penalty=penalty)
        assert sample(logits, params, rng, history) == greedy
        assert sample(logits, SamplingParams(temperature=0, repetition_penalty=penalty), rng, history) == greedy


def run_cli(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True,
                          input=input_text, timeout=120)


def test_cli_generate_streams_and_reports(model_dir, model):
    result = run_cli("generate", "To be, or not", "-m", str(model_dir), "-n", "12", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout == model.generate("To be, or not", max_tokens=12) + "\n"
    assert "tokens/s" in result.stderr


def test_cli_generate_into_a_closed_pipe_exits_quietly(model_dir):
    """`ternlm generate ... | head -1`: the reader is gone before the text is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as stdout:
        result = subprocess.run([sys.executable, "-m", "ternlm.cli", "generate", "To be", "-m", str(model_dir), "-n", "8"],
                                stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 141 and result.stderr == ""


def test_cli_samples_what_the_api_samples_with_the_same_seed(model_dir, model):
    flags = ["--temperature", "50", "--top-k", "100", "--top-p", "0.9", "--repeat-penalty", "1.2"]
    texts = {seed: run_cli("generate", "The slings", "-m", str(model_dir), "-n", "16", "--seed", str(seed), *flags)
             for seed in (7, 8)}
    for seed, result in texts.items():
        assert result.returncode == 0, result.stderr
        assert result.stdout == model.generate("The slings", max_tokens=16, temperature=50, top_k=100, top_p=0.9,
                                               repetition_penalty=1.2, seed=seed) + "\n"
    assert texts[7].stdout != texts[8].stdout


def test_cli_chat_reset_and_exit(model_dir):
    result = run_cli("chat", "-m", str(model_dir), "-n", "4", input_text="hello\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "new conversation" in result.stderr


def test_cli_info_shows_kernels(model_dir):
    result = run_cli("info", "-m", str(model_dir))
    assert result.returncode == 0, result.stderr
    assert "kernels" in result.stdout and "relu2" in result.stdout
    assert "ternary GEMM" in result.stdout
    assert "bits each by default on this CPU" in result.stdout
    result = run_cli("info", "-m", str(model_dir), "--ternary-bits", "1.6")
    assert result.returncode == 0, result.stderr
    assert "ternary weights in 1.6 bits" in result.stdout
    result = run_cli("generate", "x", "-m", str(model_dir), "--ternary-bits", "3")
    assert result.returncode == 2 and "expected 2 or 1.6" in result.stderr


def test_cli_reports_bad_model_without_traceback(tmp_path):
    result = run_cli("generate", "x", "-m", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # training needs PyTorch
def test_cli_routes_train_to_the_training_command():
    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ternlm train")


# -- the model's own sampling settings (generation_config.json) --------------------------------
def with_generation_config(model_dir, tmp_path, settings: dict):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], **settings}))
    return directory


@pytest.mark.parametrize("settings, expected", [
    ({}, {"temperature": 0.0, "repetition_penalty": 1.0}),
    ({"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.5}, {"temperature": 0.0, "repetition_penalty": 1.5}),
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}),
    ({"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 0.9, "min_p": 0.05},
     {"temperature": 0.6, "top_k": 0, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.0}),
])
def test_generation_config_sampling_as_transformers_reads_it(model_dir, tmp_path, settings, expected):
    """transformers: greedy unless do_sample; when sampling, temperature 1, top_k 50 and top_p 1 where the
    file is silent; the repetition penalty either way."""
    assert ternlm.load(with_generation_config(model_dir, tmp_path, settings)).sampling_defaults == expected


def test_generation_config_with_a_bad_value_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(ternlm.FormatError, match="generation_config.json: top_k must be a number"):
        ternlm.load(with_generation_config(model_dir, tmp_path, {"do_sample": True, "top_k": "many"}))


def test_the_models_settings_apply_where_the_caller_sets_nothing(model_dir, tmp_path, model):
    """do_sample with top_k 1 samples the most likely token: greedy, whatever the seed; a repetition
    penalty from the file changes the text unless the caller overrides it. API and CLI alike."""
    top_1 = ternlm.load(with_generation_config(model_dir, tmp_path / "a", {"do_sample": True, "top_k": 1}))
    greedy = model.generate("To be, or not", max_tokens=24, temperature=0)
    assert top_1.generate("To be, or not", max_tokens=24, seed=3) == greedy
    penalised_dir = with_generation_config(model_dir, tmp_path / "b", {"repetition_penalty": 3.0})
    penalised = ternlm.load(penalised_dir)
    text = penalised.generate("To be, or not", max_tokens=24)
    assert text == model.generate("To be, or not", max_tokens=24, repetition_penalty=3.0) != greedy
    assert penalised.generate("To be, or not", max_tokens=24, repetition_penalty=1.0) == greedy
    cli = [run_cli("generate", "To be, or not", "-m", str(directory), "-n", "24", *flags).stdout
           for directory, flags in ((penalised_dir, []), (model_dir, ["--repeat-penalty", "3"]),
                                    (penalised_dir, ["--repeat-penalty", "1"]), (model_dir, []))]
    assert cli[0] == cli[1] != cli[2] == cli[3]


def test_the_shipped_model_writes_verse_that_does_not_loop():
    """With its generation_config.json settings, no line of `ternlm generate "To be, or not to be"` comes
    back more than twice (greedy decoding repeated one line eight times). A speaker's name ("ROSALIND:")
    heads each of their speeches, so those lines may recur."""
    shipped = ternlm.load(threads=1)
    for seed in range(5):
        lines = [line for line in shipped.generate("To be, or not to be", max_tokens=256, seed=seed).splitlines()
                 if line.strip() and not line.rstrip().endswith(":")]
        assert max(lines.count(line) for line in lines) <= 2, lines


def test_generate_help_says_where_sampling_defaults_come_from():
    help_text = " ".join(run_cli("generate", "--help").stdout.split())
    assert "generation_config.json" in help_text and "else greedy" in help_text
