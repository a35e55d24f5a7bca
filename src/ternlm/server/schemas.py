"""OpenAI's request and response bodies as pydantic models: FastAPI validates requests with them and
writes the OpenAPI document (/openapi.json) from them.

Requests are strict (a string where a number belongs is an error, not converted) and fields this
server does not implement are ignored, as OpenAI's other compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
"""A string that is valid Unicode: JSON's \\u escapes can spell half a surrogate pair, which no tokenizer takes."""


class Request(BaseModel):
    model_config = ConfigDict(strict=True)


# ---- errors ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, with any status: {"error": {"message", "type", "param", "code"}}."""
    error: ErrorDetail


# ---- requests ----

class StreamOptions(Request):
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class SamplingRequest(Request):
    """What chat and text completions share."""
    model: str = Field(description="the id /v1/models lists")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate; default: the rest of the "
                                                             "context. Prompt plus max_tokens must fit the context")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; unset: the model's "
                                                                     "generation_config.json, else 1")
    top_p: float | None = Field(None, gt=0, le=1, description="unset: the model's, else 1")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings that end the text (not included in it)")
    n: int = Field(1, ge=1, le=1, description="choices per request: only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # beyond OpenAI, as llama.cpp's and vLLM's servers take them
    top_k: int | None = Field(None, ge=0, description="sample from the k most likely tokens (0: all; unset: the "
                                                      "model's, else 0)")
    min_p: float | None = Field(None, ge=0, le=1, description="drop tokens below min_p times the top probability "
                                                              "(unset: the model's, else 0)")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="penalty for the last 64 tokens (1: off; "
                                                                            "unset: the model's, else 1)")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(Request):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments object as a JSON string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(None, description="may be null only for an assistant's tool calls")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's tool calls")
    tool_call_id: str | None = Field(None, description="which tool call a `tool` message answers")

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only for an assistant message with tool_calls)")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as tools.history_messages takes it (OpenAI's dict shape)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class JSONSchemaFormat(Request):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema (default: any JSON object)")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self

    def reply_schema(self) -> dict | None:
        """The JSON schema the reply must match, None for plain text."""
        if self.type == "text":
            return None
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return {"type": "object"}


class FunctionDefinition(Request):
    name: str
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema for the arguments object")
    strict: bool | None = None


class ToolDefinition(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = Field(None, description="text, any JSON object, or a JSON schema")
    tools: list[ToolDefinition] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" by default with tools; a named function makes the model call it')
    parallel_tool_calls: bool = Field(True, description="may the model call several tools at once")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens; wins over it")
    logprobs: bool = Field(False, description="return each generated token's log probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely alternatives")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] = Field(
        description="a string, or the prompt's token ids; a list of strings must hold exactly one")
    logprobs: int | None = Field(None, ge=0, le=5, description="return each token's log probability and this many "
                                                                "most likely alternatives")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[int]:
        if prompt == []:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise ValueError("one prompt per request: this server generates one choice")
            return prompt[0]
        return prompt

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache rather than computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class CompletionBase(BaseModel):
    """What every completion, and every chunk of a streamed one, carries."""
    id: str
    created: int
    model: str


class ChatCompletion(CompletionBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(CompletionBase):
    """One server-sent event of a streamed chat completion."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(CompletionBase):
    """A text completion, and also each event of a streamed one (finish_reason null until the last)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ternlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
