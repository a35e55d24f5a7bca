"""Constrained decoding (constraints.py) and tool calls (tools.py) through the Python API.

The independent checks: every output is validated by the `jsonschema` library, regular expressions
by Python's `re`, and each mask is compared with what the tokenizer's own decoding of every token says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

import ternlm
from ternlm.constraints import ConstraintFailed, GrammarError, grammar_text
from ternlm.tools import REPLY_START, AssistantTurn, ToolError, parse_envelope, partial_reply

# Every string, array and number is bounded, so each schema's JSON ends within MAX_TOKENS whatever is sampled.
SCHEMAS = {
    "object with optional fields": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
                       "admin": {"type": "boolean"}},
        "required": ["name", "age"], "additionalProperties": False},
    "array of bounded integers": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                                  "minItems": 1, "maxItems": 5},
    "enum": {"enum": ["red", "green", "blue", 3, None]},
    "nested": {
        "type": "object",
        "properties": {"user": {"type": "object",
                                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                        "maxItems": 3}},
                                "required": ["id"], "additionalProperties": False},
                       "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "bounded numbers": {
        "type": "object",
        # multipleOf bounds the digits (a bare number may have as many as the model likes); powers of two
        # keep jsonschema's float arithmetic exact
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
                       "celsius": {"type": "number", "exclusiveMinimum": -10, "maximum": 40, "multipleOf": 0.5}},
        "required": ["score", "celsius"], "additionalProperties": False},
    "string pattern": {"type": "string", "pattern": "^[A-Z][a-z]{2,6}-[0-9]{3}$"},
    "one of two types": {"anyOf": [{"type": "string", "maxLength": 5},
                                   {"type": "integer", "minimum": 0, "maximum": 9}]},
}
SEEDS = (0, 1, 2)
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def llama3_model(llama3_model_dir):
    return ternlm.load(llama3_model_dir, threads=1)


@pytest.fixture(params=["shipped", "llama3"])
def any_model(request, default_model):
    return default_model if request.param == "shipped" else request.getfixturevalue("llama3_model")


def allowed_ids(constraint, vocab_size: int) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(constraint.mask(np.zeros(vocab_size, np.float32))))}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_validate_at_temperature_1(any_model, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        text = any_model.generate("Once upon a time", max_tokens=MAX_TOKENS, json_schema=schema,
                                  temperature=1.0, seed=seed)
        assert any_model.last_stats.finish_reason == "stop", (seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_lark_grammar_hold_in_chat(any_model):
    pattern = r"[A-Z][a-z]{1,5} (yes|no) [0-9]{2}"
    for seed in SEEDS:
        text = any_model.chat([{"role": "user", "content": "Well?"}], max_tokens=40, regex=pattern,
                              temperature=1.0, seed=seed)
        assert re.fullmatch(pattern, text), text
        text = any_model.generate("To be", max_tokens=40, grammar='start: ("ay" | "nay") ("!" | "?")',
                                  temperature=1.0, seed=seed, top_k=5, min_p=0.01, repetition_penalty=1.3)
        assert re.fullmatch(r"(ay|nay)[!?]", text), text


def test_greedy_picks_the_best_allowed_token(default_model):
    """Greedy under a regex = argmax of the model's logits over the tokens the oracle (re) allows."""
    prompt = default_model.prompt_ids("To be, or not")
    constraint = default_model.constraint(regex="[a-z ]{1,40}")
    logits = default_model.logits(prompt)[-1]
    texts = [default_model.tokenizer.decode([i], skip_special_tokens=False) for i in range(len(logits))]
    allowed = [i for i, t in enumerate(texts) if t and re.fullmatch("[a-z ]{1,40}", t)]
    best = max(allowed, key=lambda i: logits[i])
    first = next(default_model.stream_tokens(prompt, max_tokens=1, regex="[a-z ]{1,40}", temperature=0,
                                             repetition_penalty=1.0))
    assert first == best
    assert allowed_ids(constraint, len(logits)) == set(allowed)


def test_mask_matches_the_tokenizer_and_ends_with_stop_ids_only(llama3_model):
    """Digits: the mask allows exactly the tokens whose text keeps the output a prefix of [0-9]{1,3};
    once a match is complete it also allows the stop ids; once nothing can follow, only them."""
    vocab = llama3_model.config.vocab_size
    texts = [llama3_model.tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab)]
    constraint = llama3_model.constraint(regex="[0-9]{1,3}")
    stops = llama3_model.stop_ids
    assert stops == {128001, 128009}
    assert allowed_ids(constraint, vocab) == {i for i, t in enumerate(texts) if re.fullmatch("[0-9]{1,3}", t)}
    one = llama3_model.tokenizer.token_to_id("1")
    constraint.advance(one)
    assert allowed_ids(constraint, vocab) == {i for i, t in enumerate(texts) if re.fullmatch("[0-9]{1,2}", t)} | stops
    assert not constraint.complete
    constraint.advance(llama3_model.tokenizer.token_to_id("23"))
    assert constraint.complete
    assert allowed_ids(constraint, vocab) == stops


def test_a_complete_grammar_ends_without_another_step(default_model, monkeypatch):
    """Once nothing can follow, generation stops at once: no forward pass for a stop token."""
    forward, calls = default_model.engine.forward, []
    monkeypatch.setattr(default_model.engine, "forward", lambda *args: calls.append(args) or forward(*args))
    text = default_model.generate("Well", max_tokens=20, grammar='start: "yes" | "no"', temperature=1.0, seed=0)
    assert text in ("yes", "no") and default_model.last_stats.finish_reason == "stop"
    assert len(calls) == default_model.last_stats.generated_tokens  # the prompt, then one per token but the last


def test_ids_past_the_tokenizer_are_never_allowed(tmp_path, tiny_tokenizer_json):
    """A model whose vocabulary is padded past its tokenizer's (as 2B4T's files can be)."""
    from conftest import random_bitnet, write_checkpoint

    model = ternlm.load(write_checkpoint(random_bitnet(vocab_size=400), tmp_path, tiny_tokenizer_json))
    tokenizer_size = model.tokenizer.vocab_size
    assert tokenizer_size < 400
    allowed = allowed_ids(model.constraint(regex="(?s:.{0,50})"), 400)
    assert max(allowed) < tokenizer_size and len(allowed) > 200


def test_gguf_files_tokenizer(tmp_path, tiny_tokenizer_json):
    """A GGUF file's tokenizer is rebuilt from its metadata: constraints work on it too."""
    from conftest import random_bitnet, write_checkpoint
    from ternlm.weights.convert import convert_to_gguf

    hf = write_checkpoint(random_bitnet(seed=5, hidden_size=256, intermediate_size=512), tmp_path / "hf",
                          tiny_tokenizer_json)
    model = ternlm.load(convert_to_gguf(hf, tmp_path / "model.gguf", ternary="tq2_0"))
    schema = SCHEMAS["nested"]
    for seed in SEEDS:
        text = model.generate("To be", max_tokens=MAX_TOKENS, json_schema=schema, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(text), schema)


def test_pydantic_model_as_schema(default_model):
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # else the schema allows any other keys
        sensor: str = pydantic.Field(max_length=8)
        value: int = pydantic.Field(ge=0, le=99)

    text = default_model.generate("A", max_tokens=60, json_schema=Reading, temperature=1.0, seed=4)
    jsonschema.validate(json.loads(text), Reading.model_json_schema())


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "strin"}), "Invalid type"),
    (dict(json_schema={"not": {"type": "string"}}), "Unimplemented keys"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
    (dict(json_schema={"$ref": "https://example.com/schema.json"}), "retriev"),
    (dict(json_schema={"type": "string", "pattern": "(a"}), "unclosed group"),
    (dict(json_schema=[1, 2]), "must be a dict"),
    (dict(json_schema={"enum": [{1, 2}]}), "not JSON"),
    (dict(regex="(a"), "unclosed group"),
    (dict(grammar="start: undefined_rule"), "unknown name"),
    (dict(json_schema={"enum": [f"value {i}" * 3 for i in range(30000)]}), "too big"),
    (dict(json_schema={"allOf": [{"anyOf": [{"required": [f"a{i}"]}, {"required": [f"b{i}"]}]}
                                 for i in range(20)]}), "too large"),
])
def test_bad_grammars_raise_grammar_errors(default_model, kwargs, message):
    with pytest.raises(GrammarError, match=message):
        default_model.generate("A", max_tokens=4, **kwargs)


def test_one_constraint_at_a_time(default_model):
    with pytest.raises(ValueError, match="not json_schema and regex"):
        grammar_text(json_schema={}, regex="a")


def test_a_grammar_failing_while_generating_ends_that_generation(default_model):
    """a{1000000} compiles, then its lexer runs out of fuel after the first token: a clear error, soon."""
    tokens = default_model.stream_tokens(default_model.prompt_ids("A"), max_tokens=50, regex="((a{100}){100}){100}")
    with pytest.raises(ConstraintFailed, match="too many expressions"):
        list(tokens)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
               "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(turn: AssistantTurn, tools: list[dict], names: set[str]) -> None:
    assert turn.content is None and turn.tool_calls
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in turn.tool_calls:
        assert call.name in names and call.id.startswith("call_")
        jsonschema.validate(call.arguments, parameters[call.name])
        assert json.loads(call.openai()["function"]["arguments"]) == call.arguments


def test_tool_choices(llama3_model):
    tools = [WEATHER, TIME]
    for seed in SEEDS:
        turn = llama3_model.chat(ASK, max_tokens=600, tools=tools, tool_choice="required", temperature=1.0, seed=seed)
        check_calls(turn, tools, {"get_weather", "get_time"})
        named = {"type": "function", "function": {"name": "get_time"}}
        turn = llama3_model.chat(ASK, max_tokens=120, tools=tools, tool_choice=named, temperature=1.0, seed=seed,
                                 parallel_tool_calls=False)
        check_calls(turn, tools, {"get_time"})
        assert len(turn.tool_calls) == 1
        turn = llama3_model.chat(ASK, max_tokens=600, tools=tools, temperature=1.0, seed=seed)
        assert turn.tool_calls or isinstance(turn.content, str)
        if turn.tool_calls:
            check_calls(turn, tools, {"get_weather", "get_time"})
    turn = llama3_model.chat(ASK, max_tokens=8, tools=tools, tool_choice="none", temperature=1.0, seed=0)
    assert turn.tool_calls == [] and isinstance(turn.content, str)


def test_auto_tool_choice_can_reply_in_a_schema(llama3_model):
    reply = {"type": "object", "properties": {"answer": {"enum": ["sunny", "rainy"]}}, "required": ["answer"],
             "additionalProperties": False}
    replies = 0
    for seed in range(8):
        turn = llama3_model.chat(ASK, max_tokens=120, tools=[WEATHER], json_schema=reply, temperature=1.0, seed=seed,
                                 parallel_tool_calls=False)
        if turn.tool_calls:
            check_calls(turn, [WEATHER], {"get_weather"})
        else:
            jsonschema.validate(json.loads(turn.content), reply)
            replies += 1
    assert 0 < replies < 8  # both branches of the envelope are taken


def test_tool_results_in_the_history(llama3_model):
    """The whole round trip: a call, its result as a `tool` message, then the answer."""
    turn = llama3_model.chat(ASK, max_tokens=120, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=1,
                             parallel_tool_calls=False)
    history = ASK + [turn.message(), {"role": "tool", "tool_call_id": turn.tool_calls[0].id, "content": "21 C"}]
    prompt = llama3_model.tokenizer.decode(llama3_model.chat_prompt_ids(history), skip_special_tokens=False)
    assert json.dumps({"tool_calls": [{"name": "get_weather", "arguments": turn.tool_calls[0].arguments}]},
                      ensure_ascii=False) in prompt  # the prompt holds the text itself, not \u escapes
    assert json.dumps({"tool_response": {"tool_call_id": turn.tool_calls[0].id, "name": "get_weather",
                                         "content": "21 C"}}, ensure_ascii=False) in prompt
    answer = llama3_model.chat(history, max_tokens=20, tools=[WEATHER], tool_choice="none")
    assert isinstance(answer.content, str)


def test_partial_reply_decodes_every_prefix_of_an_envelope():
    """Cut anywhere, json.dumps's envelope gives a prefix of the reply, growing, whole at the end."""
    for reply in ['He said "hi"\\n', "tab\tnew\nline \\ back", "é 世界 😀 \u0001 end", ""]:
        for ascii_only in (True, False):
            envelope = json.dumps({"response": reply}, ensure_ascii=ascii_only)
            known = [partial_reply(envelope[:n]) for n in range(len(REPLY_START), len(envelope) + 1)]
            assert all(reply.startswith(k) for k in known) and known[-1] == reply
            assert all(len(a) <= len(b) for a, b in zip(known, known[1:]))
            for k in known:
                k.encode("utf-8")  # raises on half a surrogate pair
    assert partial_reply('{"tool_calls": [') is None
    assert parse_envelope('{"response": "cut sho').content == "cut sho"


@pytest.mark.parametrize("tools, choice, message", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "letters, digits"),
    ([WEATHER, WEATHER], "auto", "two tools are named"),
    ([{"type": "retrieval"}], "auto", "must be"),
])
def test_bad_tools_raise_tool_errors(default_model, tools, choice, message):
    with pytest.raises(ToolError, match=message):
        default_model.chat(ASK, tools=tools, tool_choice=choice)


def test_a_tool_whose_parameters_do_not_compile_is_named(llama3_model):
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(ToolError, match="'broken'.*Unimplemented") as error:
        llama3_model.chat(ASK, tools=[WEATHER, bad])
    assert error.value.param == "tools.1.function.parameters"


def test_cli_generate_constrained(tmp_path, default_model):
    schema = SCHEMAS["nested"]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "yes.lark").write_text('start: "yes" | "no"')
    cli = [sys.executable, "-m", "ternlm.cli", "generate", "To be", "-n", "80", "--temperature", "1", "--seed", "3"]
    result = subprocess.run([*cli, "--json-schema", str(tmp_path / "schema.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout.splitlines()[-1]), schema)
    result = subprocess.run([*cli, "--grammar", str(tmp_path / "yes.lark")], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] in ("yes", "no")
    for flags, message in [(["--regex", "(a"], "unclosed group"), (["--json-schema", "missing.json"], "file not found"),
                           (["--regex", "a", "--grammar", "g"], "not allowed with")]:
        result = subprocess.run([*cli, *flags], capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
