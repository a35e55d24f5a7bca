"""`response_format` and `tools` on the server, through the official openai client, whole and streamed.

The independent check is the `jsonschema` library (and the openai client's own parsing into pydantic
models); the shipped model answers JSON, a tiny LLaMA-3-vocabulary model with a longer context the
tool calls (the tool instructions do not fit the shipped model's 256 positions).
"""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import ternlm
from test_constraints import WEATHER
from test_server import MODEL_ID, client, running_server, wait_until

SEEDS = (0, 1, 2)


class Reading(BaseModel):
    sensor: str = Field(max_length=8)
    value: int = Field(ge=0, le=99)
    ok: bool


ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 23}},
                                        "required": ["hour"], "additionalProperties": False}}}
TOOLS = [WEATHER, ALARM]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, served):
        yield url, served


@pytest.fixture(scope="module")
def tool_server(llama3_model_dir):
    with running_server(ternlm.load(llama3_model_dir, threads=1)) as (url, served):
        yield url, served


def test_parse_into_a_pydantic_model(server):
    url, _ = server
    for seed in SEEDS:
        completion = client(url).chat.completions.parse(
            model=MODEL_ID, messages=[{"role": "user", "content": "Read the sensor"}], response_format=Reading,
            max_tokens=80, temperature=1.0, seed=seed)
        message = completion.choices[0].message
        assert isinstance(message.parsed, Reading) and completion.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(message.content), Reading.model_json_schema())


def test_parse_streamed(server):
    url, _ = server
    for seed in SEEDS:
        with client(url).chat.completions.stream(
                model=MODEL_ID, messages=[{"role": "user", "content": "Read the sensor"}], response_format=Reading,
                max_tokens=80, temperature=1.0, seed=seed) as stream:
            pieces = [event.delta for event in stream if event.type == "content.delta"]
            completion = stream.get_final_completion()
        assert len(pieces) > 3  # the JSON came as it was generated
        assert isinstance(completion.choices[0].message.parsed, Reading)
        jsonschema.validate(json.loads("".join(pieces)), Reading.model_json_schema())


def test_json_object(server):
    """Any JSON object: unbounded, so this weak model runs out of tokens inside its first string; what
    ends with "stop" must parse."""
    url, _ = server
    for seed in SEEDS:
        choice = client(url).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "JSON please"}], max_tokens=100,
            response_format={"type": "json_object"}, temperature=1.0, seed=seed).choices[0]
        assert choice.message.content.startswith('{"')
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def check_calls(message, names: set[str]) -> None:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)


@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "set_alarm"}),
    ({"type": "function", "function": {"name": "set_alarm"}}, {"set_alarm"}),
])
def test_tool_calls(tool_server, choice, names):
    url, _ = tool_server
    for seed in SEEDS:
        completion = client(url).chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                         parallel_tool_calls=False, max_tokens=100, temperature=1.0,
                                                         seed=seed)
        assert completion.choices[0].finish_reason == "tool_calls"
        check_calls(completion.choices[0].message, names)


def test_tool_calls_streamed(tool_server):
    url, _ = tool_server
    for seed in SEEDS:
        with client(url).chat.completions.stream(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                                 max_tokens=600, temperature=1.0, seed=seed) as stream:
            completion = stream.get_final_completion()
        assert completion.choices[0].finish_reason == "tool_calls"
        check_calls(completion.choices[0].message, {"get_weather", "set_alarm"})


def test_auto_answers_or_calls_and_the_conversation_goes_on(tool_server):
    """With tool_choice "auto" the model may call or answer; the answer follows response_format
    (a bounded one: a random model's free text runs on)."""
    url, _ = tool_server
    answer_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"enum": ["sunny", "rainy"]}}}
    kinds = set()
    for seed in range(8):
        completion = client(url).chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER],
                                                         response_format=answer_format, parallel_tool_calls=False,
                                                         max_tokens=100, temperature=1.0, seed=seed)
        message, finish = completion.choices[0].message, completion.choices[0].finish_reason
        kinds.add(finish)
        if finish == "tool_calls":
            check_calls(message, {"get_weather"})
            history = ASK + [message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21 C, sunny"}]
            answer = client(url).chat.completions.create(model=MODEL_ID, messages=history, tools=[WEATHER],
                                                         tool_choice="none", max_tokens=10, temperature=0)
            assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
        else:
            assert finish == "stop" and json.loads(message.content) in ("sunny", "rainy") and not message.tool_calls
    assert kinds == {"tool_calls", "stop"}


def test_a_text_reply_streams_as_it_is_generated(tool_server):
    """With tools offered, a text reply comes in pieces, the same text as unstreamed (same seed)."""
    url, _ = tool_server
    for seed in range(8):
        request = dict(model=MODEL_ID, messages=ASK, tools=[WEATHER], parallel_tool_calls=False, max_tokens=40,
                       temperature=1.0, seed=seed)
        whole = client(url).chat.completions.create(**request).choices[0]
        if whole.finish_reason == "tool_calls" or whole.message.content.startswith('{"tool_calls"'):
            continue  # a call, or one cut short by max_tokens
        chunks = list(client(url).chat.completions.create(**request, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 3 and "".join(pieces) == whole.message.content
        assert not whole.message.content.startswith('{"response"')
        return
    pytest.fail("no seed answered in text")


def test_a_grammar_failing_while_generating_ends_only_its_request(server):
    """a{1000000} compiles, then runs out of lexer fuel after its first token, while a normal request
    shares its steps: that one ends with an error, the other with its answer."""
    url, served = server
    hostile = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string",
                                                                                 "pattern": "^((a{100}){100}){100}$"}}}
    results = {}

    def run(name, **extra):
        try:
            results[name] = client(url).chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, **extra)
        except openai.APIStatusError as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=("hostile",), kwargs={"response_format": hostile}),
               threading.Thread(target=run, args=("normal",))]
    with served.model.engine.held():
        for t in threads:
            t.start()
        wait_until(lambda: len(served.scheduler.running) + len(served.scheduler.waiting) == 2, "both requests")
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results["hostile"], openai.InternalServerError)
    assert "too many expressions" in results["hostile"].message
    assert results["normal"].choices[0].finish_reason == "length"
    assert served.scheduler.alive


BAD = [
    # (what, extra body fields, param the error names, words of the message)
    ("schema with an unknown type", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format", "Invalid type"),
    ("unsupported schema keyword", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {}}}}}, "response_format", "Unimplemented"),
    ("hostile enum", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"enum": [f"value {i}" * 3 for i in range(30000)]}}}}, "response_format", "too big"),
    ("json_schema without its schema object", {"response_format": {"type": "json_schema"}}, "response_format",
     "json_schema is required"),
    ("unknown function in tool_choice", {"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "launch"}}}, "tool_choice", "'launch'"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("bad tool name", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name",
     "letters"),
    ("tool parameters that do not compile", {"tools": [WEATHER, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}]},
     "tools.1.function.parameters", "'f'"),
    ("tool message without its call id", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0",
     "tool_call_id"),
]


@pytest.mark.parametrize("what, extra, param, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_400_naming_the_problem(server, what, extra, param, words):
    url, _ = server
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client(url).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=2).choices[0].message.content is not None
