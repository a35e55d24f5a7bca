"""Hostile model files, one problem at a time: each is refused with a FormatError (or, for a chat
template that fails while rendering, the ValueError ChatTemplate.render documents), before the
loader allocates anything the file does not back. No file is ever unpickled."""

from __future__ import annotations

import ast
import json
import shutil
import struct
from pathlib import Path

import pytest

import ternlm
from fuzz.targets import HF_FILES, seed_files
from ternlm.chat import MAX_STEPS, ChatTemplate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """The fuzz seeds' tiny model (one layer, hidden size 128), as a directory to spoil."""
    for target, filename in HF_FILES.items():
        shutil.copy(seed_files(target)[0], tmp_path / filename)
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_the_seed_model_loads(model_dir):
    assert ternlm.load(model_dir, threads=1).generate("To be", max_tokens=3) is not None


@pytest.mark.parametrize("filename", ["config.json", "tokenizer_config.json"])
def test_json_nested_past_the_recursion_limit(model_dir, filename):
    (model_dir / filename).write_text("[" * 100_000)
    with pytest.raises(ternlm.FormatError, match="nested too deeply"):
        ternlm.load(model_dir)


def test_safetensors_header_nested_past_the_recursion_limit(model_dir):
    header = b"[" * 100_000
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ternlm.FormatError, match="nested too deeply"):
        ternlm.load(model_dir)


def test_safetensors_shape_whose_size_overflows_int64(model_dir):
    """2**62 * 4 elements wraps to 0 in int64: the empty data range must not pass for it."""
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}).encode()
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ternlm.FormatError, match="0 bytes for shape"):
        ternlm.load(model_dir)


@pytest.mark.parametrize("changes, problem", [
    ({"num_hidden_layers": 10**9}, "describes .* weights"),
    ({"head_dim": 2**40}, "describes .* weights"),
    ({"vocab_size": 2**40}, "describes .* weights"),
    ({"num_attention_heads": 0, "head_dim": None}, "invalid config|positive integer"),
    ({"quantization_config": [1]}, "must be an object"),
    ({"rope_scaling": "llama3"}, "must be an object"),
    ({"rope_parameters": [1]}, "must be an object"),
    ({"rope_scaling": {"rope_type": "llama3"}}, "needs a `factor`"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8"}}, "positive number `factor`"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 2, "high_freq_factor": 2}},
     "high_freq_factor != low_freq_factor"),
    ({"architectures": None, "model_type": ["bitnet"]}, "architectures"),
    ({"architectures": [7]}, "list of names"),
    ({"eos_token_id": 2.5}, "eos_token_id must be"),
    ({"bos_token_id": 10**30}, "outside the vocabulary"),
    ({"bos_token_id": True}, "outside the vocabulary"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
])
def test_hostile_config_values(model_dir, changes, problem):
    edit_config(model_dir, **changes)
    with pytest.raises(ternlm.FormatError, match=problem):
        ternlm.load(model_dir)


def test_generation_config_ids_outside_the_vocabulary_are_ignored(model_dir):
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 10**30, -1, "x"]}))
    assert ternlm.load(model_dir, threads=1).stop_ids == {1, 2}


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, problem", [
    ('{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}', f"over {MAX_STEPS} steps"),
    ('{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}', "RecursionError"),
    ('{{ "a" * 10**9 }}', "would make"),
    ('{{ [1] * 10**9 }}', "would make"),
    ('{{ 7 ** 10000000 }}', "would make a number"),
    ('{{ "x"|center(10**9) }}', "over 100000"),
    ('{{ [1, 2]|batch(10**9)|list }}', "over 100000"),
    ("{{ '%0999999d' % 1 }}", "format widths"),
    ("{{ '%0999999d'|format(1) }}", "format widths"),
    ("{{ '{:>9999999}'.format(1) }}", "format widths"),
    ("{{ 'a'.ljust(10**9) }}", "over 100000"),
    ('{% for i in range(99999) %}{{ "x" * 99 }}{% endfor %}', "rendered text is over"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ ''.__class__.__mro__ }}", "unsafe|not safely"),
])
def test_chat_template_limits(template, problem):
    with pytest.raises(ValueError, match=problem) as refused:
        ChatTemplate(template).render(MESSAGES)
    assert type(refused.value) is ValueError


def test_chat_template_limits_leave_real_templates_alone():
    llama3 = (ROOT / "fuzz" / "seeds" / "chat_template" / "llama3_style.jinja").read_text()
    conversation = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 50} for i in range(500)]
    text = ChatTemplate(llama3, bos_token="<s>").render(conversation)
    assert text.startswith("<s><|start_header_id|>user") and text.count("<|eot_id|>") == 500


# ---- no pickle anywhere ----

SOURCES = sorted([*ROOT.glob("src/ternlm/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("fuzz/*.py"),
                  *ROOT.glob("recipes/**/*.py")])
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle: any use of pickle-like modules, torch.load without weights_only=True,
    np.load / pandas with allow_pickle=True, and pandas.read_pickle."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            problems.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"line {node.lineno}: {name} without weights_only=True")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"line {node.lineno}: {name} with allow_pickle")
            if name.endswith("read_pickle"):
                problems.append(f"line {node.lineno}: {name}")
    return problems


def test_the_pickle_scan_finds_what_it_looks_for():
    source = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\ntorch.load('x')\n"
              "torch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
              "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=False)\n")
    assert len(unsafe_loads(source)) == 5


def test_nothing_is_unpickled():
    assert len(SOURCES) > 30
    found = {str(path.relative_to(ROOT)): unsafe_loads(path.read_text(encoding="utf-8")) for path in SOURCES}
    assert {path: problems for path, problems in found.items() if problems} == {}


# ---- the C++ core's own checks, for callers that skip the Python ones ----

def test_core_refuses_shapes_and_contexts_that_would_overflow_its_buffers():
    from ternlm import _core
    from ternlm.config import BitNetConfig
    from ternlm.engines import model_shape

    shape = model_shape(BitNetConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="too large for a KV cache"):
        _core.KVCache(shape, 2**62)
    shape.kv_heads = 0
    with pytest.raises(ValueError, match="must be positive"):
        _core.Model(shape, 1)
    with pytest.raises(ValueError, match="must be positive"):
        _core.KVCache(shape, 16)


def test_tokenizer_with_a_token_id_past_the_model_vocabulary(model_dir):
    """Found by fuzzing: 300 tokens, but one with id 538; it loaded, and its id reached the engine's check."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["Ġno"] = 538
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ternlm.FormatError, match="token id 538 but the model's vocab_size is 300"):
        ternlm.load(model_dir)
