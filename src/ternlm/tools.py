"""Tool calling with any chat template: the tools are written into the system prompt, and the answer
is constrained to a JSON envelope that either replies or calls tools (llama.cpp's "generic" format),
then read back into OpenAI's shape.

The envelope is one JSON object, either
    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]}
to call tools (each `arguments` valid against that function's `parameters`), or
    {"response": "the reply"}
to answer (with a JSON schema for the answer, `response` holds a value of that schema). In the
history, an assistant turn that called tools is written back as its envelope, and a `tool` message
as a user turn holding {"tool_response": {"tool_call_id", "name", "content"}}.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")


class ToolError(ValueError):
    """Tools, a tool choice or a message that cannot be used; `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object
    index: int        # its place in the request's tools


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict

    def openai(self) -> dict:
        """OpenAI's shape: the arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class AssistantTurn:
    """What chat(..., tools=...) returns: a reply (content) or tool calls (content None)."""
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict:
        """The turn as an OpenAI assistant message, to append to the conversation."""
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.openai() for call in self.tool_calls]
        return message


def parse_tools(tools: list) -> list[Tool]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if not isinstance(tools, list):
        raise ToolError("tools must be a list", "tools")
    parsed = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}",
                            f"{where}.function.name")
        if any(t.name == name for t in parsed):
            raise ToolError(f"two tools are named {name!r}", f"{where}.function.name")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        parsed.append(Tool(name, description, parameters, i))
    return parsed


@dataclass
class ToolUse:
    """The tools a request offers the model, after its tool_choice."""
    tools: list[Tool]       # empty: the model answers in plain text (tool_choice "none", or no tools)
    required: bool          # it must call a tool
    parallel: bool = True   # it may call several at once

    @classmethod
    def choose(cls, tools: list, tool_choice="auto", parallel: bool = True) -> ToolUse:
        """tool_choice: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""
        offered = parse_tools(tools)
        if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES:
            return cls(offered if tool_choice != "none" else [], tool_choice == "required", parallel)
        if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            name = tool_choice["function"].get("name")
            named = [t for t in offered if t.name == name]
            if not named:
                raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(t.name for t in offered) or 'none given'})", "tool_choice")
            return cls(named, True, parallel)
        raise ToolError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                        f'{{"name": ...}}}}, got {tool_choice!r}', "tool_choice")

    def envelope_schema(self, response_schema: dict | None = None) -> dict:
        """The JSON schema of the answer; `response_schema` constrains a reply (default: any string)."""
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        call_list = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            call_list["maxItems"] = 1
        tool_calls = {"type": "object", "properties": {"tool_calls": call_list}, "required": ["tool_calls"],
                      "additionalProperties": False}
        if self.required:
            return tool_calls
        response = {"type": "object", "properties": {"response": response_schema or {"type": "string"}},
                    "required": ["response"], "additionalProperties": False}
        return {"anyOf": [tool_calls, response]}

    def blame(self, compile_schema) -> None:
        """After the envelope failed to compile: raises a ToolError naming the first tool whose
        parameters fail on their own (`compile_schema(schema)` raises for a bad one)."""
        for tool in self.tools:
            try:
                compile_schema(tool.parameters)
            except ValueError as e:
                raise ToolError(f"the parameters of tool {tool.name!r}: {e}",
                                f"tools.{tool.index}.function.parameters") from None

    def system_prompt(self) -> str:
        listing = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                              for t in self.tools], ensure_ascii=False)
        call = 'call tools with {"tool_calls": [{"name": <the tool\'s name>, "arguments": <its arguments>}]}'
        how = f"You must {call}." if self.required else \
            f'Either {call}, or reply to the user with {{"response": <your reply>}}.'
        return f"You can use these tools:\n{listing}\nAnswer with one JSON object. {how}"

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation with the tools in its system message, for any chat template."""
        messages = history_messages(messages)
        if not self.tools:
            return messages
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{self.system_prompt()}"}, *messages[1:]]
        return [{"role": "system", "content": self.system_prompt()}, *messages]


def history_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as plain role/content text: an assistant turn's tool calls become its envelope,
    a `tool` message a user turn holding the tool's response."""
    names = {}  # tool call id -> function name
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ToolError(f"messages.{i} must be an object", f"messages.{i}")
        role, content = message.get("role"), message.get("content")
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            envelope = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ToolError(f"messages.{i}.tool_calls.{j} must have function.name", f"messages.{i}.tool_calls")
                names[call.get("id")] = function["name"]
                envelope.append({"name": function["name"], "arguments": _arguments(function.get("arguments", "{}"))})
            text = json.dumps({"tool_calls": envelope}, ensure_ascii=False)
            plain.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif role == "tool":
            if not isinstance(content, str):
                raise ToolError(f"messages.{i}.content must be a string", f"messages.{i}.content")
            call_id = message.get("tool_call_id")
            response = {"tool_call_id": call_id, "name": names.get(call_id), "content": content}
            plain.append({"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)})
        else:
            plain.append({"role": role, "content": content})
    return plain


def _arguments(text):
    """A history's arguments, a JSON string in OpenAI's shape, as the value the envelope holds."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


REPLY_START = '{"response": "'  # a text reply's envelope, as the compact JSON grammar writes it


def partial_reply(envelope: str) -> str | None:
    """The text of a {"response": "..."} envelope, as much of it as is known while the envelope is
    still being generated (an escape sequence cut short is left out); None for another envelope."""
    if not envelope.startswith(REPLY_START):
        return None
    body = envelope[len(REPLY_START):]
    for end in range(len(body), max(len(body) - 12, -1), -1):  # an escape is at most 12 characters
        try:
            text, _ = json.JSONDecoder().raw_decode(f'"{body[:end]}"')  # stops at the reply's closing quote
        except json.JSONDecodeError:
            continue
        return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text  # half a surrogate pair
    return ""


def parse_envelope(text: str, json_reply: bool = False) -> AssistantTurn:
    """The model's envelope as a reply or tool calls. Of an envelope cut short (by max_tokens or a
    stop string), the text reply so far, or else the text itself, is the reply. json_reply: the reply
    had a JSON schema, so its content is JSON text (else the reply string itself)."""
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError:
        reply = None if json_reply else partial_reply(text)
        return AssistantTurn(text if reply is None else reply)
    calls = envelope.get("tool_calls") if isinstance(envelope, dict) else None
    if isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return AssistantTurn(None, [ToolCall(f"call_{uuid.uuid4().hex[:24]}", c["name"], c.get("arguments", {}))
                                    for c in calls])
    if isinstance(envelope, dict) and "response" in envelope:
        reply = envelope["response"]
        return AssistantTurn(json.dumps(reply, ensure_ascii=False) if json_reply else reply)
    return AssistantTurn(text)
