"""The bodies a request receives: one JSON object, or server-sent events as the scheduler's updates
arrive, for chat completions (text or tool calls) and text completions, in OpenAI's shapes."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..tools import parse_envelope, partial_reply
from .scheduler import Sequence, TokenLogprob, Update
from .schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                      ChoiceLogprobs, Completion, CompletionChoice, CompletionLogprobs, DeltaMessage, ErrorDetail,
                      ErrorResponse, PromptTokensDetails, TokenLogprob as TokenLogprobSchema, ToolCallDelta,
                      TopLogprob, Usage)

if TYPE_CHECKING:
    from .app import ServedModel


def usage_of(sequence: Sequence) -> Usage:
    return Usage(prompt_tokens=sequence.prompt_tokens, completion_tokens=sequence.completion_tokens,
                 total_tokens=sequence.prompt_tokens + sequence.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sequence.cached_tokens))


class Reply:
    """One request's answer in the shape of its endpoint: whole, or as stream chunks."""

    def __init__(self, served: ServedModel, id_prefix: str, include_usage: bool):
        self.served, self.include_usage = served, include_usage
        self.id, self.created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def opening(self) -> BaseModel | None:
        return None

    def chunk(self, update: Update) -> BaseModel | None:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def whole(self, text: str, logprobs: list[TokenLogprob], finish_reason: str, usage: Usage) -> BaseModel:
        raise NotImplementedError


class ChatReply(Reply):
    def __init__(self, served: ServedModel, include_usage: bool, logprobs: bool):
        super().__init__(served, "chatcmpl", include_usage)
        self.logprobs = logprobs

    def _logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if not self.logprobs:
            return None
        token_text = self.served.token_text

        def top(token: int, logprob: float) -> TopLogprob:
            text = token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChoiceLogprobs(content=[TokenLogprobSchema(**top(e.token, e.logprob).model_dump(),
                                                          top_logprobs=[top(t, lp) for t, lp in e.top])
                                       for e in entries])

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.served.id, choices=choices,
                                   usage=usage)

    def opening(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])

    def chunk(self, update: Update) -> ChatCompletionChunk | None:
        if not (update.text or update.finish_reason or (self.logprobs and update.logprob)):
            return None
        delta = DeltaMessage(content=update.text) if update.text else DeltaMessage()
        logprobs = self._logprobs([update.logprob] if update.logprob else [])
        return self._chunk([ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=update.finish_reason)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def whole(self, text, logprobs, finish_reason, usage) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text), logprobs=self._logprobs(logprobs),
                            finish_reason=finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.served.id, choices=[choice], usage=usage)


class ToolCallReply(ChatReply):
    """A chat reply whose text is a tool envelope (tools.py), sent as a reply or as tool calls.
    Streamed, a text reply comes as it is generated; tool calls and a reply in response_format's
    schema come whole in the last chunk."""

    def __init__(self, served: ServedModel, include_usage: bool, logprobs: bool, json_reply: bool):
        super().__init__(served, include_usage, logprobs)
        self.json_reply = json_reply  # a reply follows response_format's schema: its content is JSON text
        self.text: list[str] = []
        self.shown = 0  # characters of the text reply already sent

    def opening(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant"))])  # content null: it may be calls

    def chunk(self, update: Update) -> ChatCompletionChunk | None:
        self.text.append(update.text)
        envelope = "".join(self.text)
        logprobs = self._logprobs([update.logprob] if update.logprob else [])
        if update.finish_reason:
            turn = parse_envelope(envelope, self.json_reply)
            calls = [ToolCallDelta(index=i, **call.openai()) for i, call in enumerate(turn.tool_calls)]
            delta = DeltaMessage(tool_calls=calls) if calls else DeltaMessage(content=turn.content[self.shown:])
            return self._chunk([ChatChunkChoice(delta=delta, logprobs=logprobs,
                                                finish_reason="tool_calls" if calls else update.finish_reason)])
        reply = None if self.json_reply else partial_reply(envelope)
        new = reply[self.shown:] if reply else ""
        self.shown += len(new)
        if not (new or logprobs):
            return None
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(content=new or None), logprobs=logprobs)])

    def whole(self, text, logprobs, finish_reason, usage) -> ChatCompletion:
        turn = parse_envelope(text, self.json_reply)
        message = AssistantMessage(**turn.message())
        choice = ChatChoice(message=message, logprobs=self._logprobs(logprobs),
                            finish_reason="tool_calls" if turn.tool_calls else finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.served.id, choices=[choice], usage=usage)


class CompletionReply(Reply):
    def __init__(self, served: ServedModel, include_usage: bool, logprobs: int | None):
        super().__init__(served, "cmpl", include_usage)
        self.logprobs = logprobs
        self.text_offset = 0  # where the next token's text starts in the generated text

    def _logprobs(self, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        tokens = [self.served.token_text(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                                  top_logprobs=[{self.served.token_text(t): lp for t, lp in e.top} for e in entries],
                                  text_offset=offsets)

    def _completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.served.id, choices=choices, usage=usage)

    def chunk(self, update: Update) -> Completion | None:
        if not (update.text or update.finish_reason or (self.logprobs is not None and update.logprob)):
            return None
        logprobs = self._logprobs([update.logprob] if update.logprob else [])
        return self._completion([CompletionChoice(text=update.text, logprobs=logprobs,
                                                  finish_reason=update.finish_reason)])

    def usage_chunk(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def whole(self, text, logprobs, finish_reason, usage) -> Completion:
        choice = CompletionChoice(text=text, logprobs=self._logprobs(logprobs), finish_reason=finish_reason)
        return self._completion([choice], usage)


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events of one sequence. However the response ends (the client may leave before
    the first event), the sequence is cancelled: a no-op once it has finished, else its slot is freed."""

    def __init__(self, reply: Reply, sequence: Sequence):
        super().__init__(self._events(reply, sequence), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.sequence = sequence

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sequence.cancel()

    @staticmethod
    async def _events(reply: Reply, sequence: Sequence) -> AsyncIterator[str]:
        opening = reply.opening()
        if opening is not None:
            yield _event(opening)
        async for update in sequence.updates():
            if update.error:
                yield _event(ErrorResponse(error=ErrorDetail(message=update.error, type="server_error")))
                return
            chunk = reply.chunk(update)
            if chunk is not None:
                yield _event(chunk)
        if reply.include_usage:
            yield _event(reply.usage_chunk(usage_of(sequence)))
        yield "data: [DONE]\n\n"
