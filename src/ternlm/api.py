"""The Python API: `ternlm.load(...)` returns a LanguageModel with logits/generate/stream/chat."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from .chat import ChatTemplate, usable_template
from .config import BitNetConfig
from .constraints import GrammarError, Grammars, TokenConstraint, grammar_text, schema_dict
from .errors import FormatError
from .generate import ContextOverflowError, GenerationStats, generate_tokens, stream_text
from .hub import resolve_model_path
from .engines import build_engine
from .prompt_cache import PromptCache
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tools import AssistantTurn, ToolUse, history_messages, parse_envelope
from .weights import open_checkpoint
from .weights.checkpoint import Checkpoint, return_freed_memory


class LanguageModel:
    def __init__(self, path: Path, engine, tokenizer: Tokenizer, stop_ids: set[int], n_ctx: int, backend: str,
                 prompt_cache_mb: float = 0, sampling_defaults: dict | None = None):
        self.path = path
        self.engine = engine
        # The keys and values of computed tokens, for the next prompt that starts with them (None: off).
        self.prompt_cache = PromptCache.for_engine(engine, int(prompt_cache_mb * 2**20), n_ctx) \
            if prompt_cache_mb > 0 else None
        self.config: BitNetConfig = engine.config
        self.tokenizer = tokenizer
        self.backend = backend
        self.n_ctx = n_ctx
        bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        template = usable_template(tokenizer.chat_template, bos or "", eos or "",
                                   tokenizer.token_to_id("<|eot_id|>") is not None)
        self.chat_template = ChatTemplate(template, bos or "", eos or "", origin=str(path))
        self.stop_ids = stop_ids
        self.sampling_defaults = sampling_defaults or {}  # the model's generation_config.json
        self.last_stats = GenerationStats()
        self.grammars = Grammars(tokenizer, self.config.vocab_size, stop_ids)

    def __repr__(self) -> str:
        return f"LanguageModel({str(self.path)!r}, backend={self.backend!r})"

    @property
    def threads(self) -> int:
        return self.engine.threads

    def logits(self, ids) -> np.ndarray:
        """float32 [len(ids), vocab]: every position of a fresh sequence starting at position 0.
        Every position is computed (the logits of a cached prefix are not kept), and the keys and
        values are left in the prompt cache for a later generation."""
        ids = self.check_ids(ids)
        if self.prompt_cache is None:
            return self.engine.forward(self.engine.new_cache(len(ids)), ids, 0, all_logits=True)
        cache = self.prompt_cache.new_cache(len(ids))
        logits = self.engine.forward(cache, ids, 0, all_logits=True)
        self.prompt_cache.keep(ids, cache)
        return logits

    def reset_prompt_cache(self) -> None:
        """Drops every cached prompt (new prompts are computed whole, then cached again)."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def check_ids(self, ids) -> list[int]:
        """The ids as ints; raises ValueError unless they are a non-empty sequence in the vocabulary and context."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("no token ids")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
        return ids

    def sampling(self, fallback: dict | None = None, **given) -> SamplingParams:
        """Sampling settings: what the caller gives (None counts as not given), else the model's
        generation_config.json, else `fallback`, else SamplingParams' own defaults (greedy)."""
        chosen = {**(fallback or {}), **self.sampling_defaults, **{k: v for k, v in given.items() if v is not None}}
        return SamplingParams(**chosen)

    def constraint(self, json_schema=None, regex: str | None = None, grammar: str | None = None,
                   tools: ToolUse | None = None) -> TokenConstraint | None:
        """A new generation's constraint: at most one of a JSON schema (dict or pydantic model class),
        a regular expression or a Lark grammar; with tools to offer, their envelope (tools.py), its
        reply of json_schema. None when nothing is asked. Raises GrammarError or ToolError naming
        the problem."""
        if tools is not None and tools.tools:
            if regex is not None or grammar is not None:
                raise ValueError("tools take json_schema for the reply, not regex or grammar")
            envelope = tools.envelope_schema(None if json_schema is None else schema_dict(json_schema))
            try:
                return self.grammars.constraint(grammar_text(json_schema=envelope))
            except GrammarError:
                tools.blame(lambda schema: self.grammars.constraint(grammar_text(json_schema=schema)))
                raise
        text = grammar_text(json_schema, regex, grammar)
        return None if text is None else self.grammars.constraint(text)

    def stream_tokens(self, prompt_ids, max_tokens: int = 128, json_schema=None, regex: str | None = None,
                      grammar: str | None = None, tool_use: ToolUse | None = None, **sampling) -> Iterator[int]:
        params = self.sampling(**sampling)
        prompt_ids = self.check_ids(prompt_ids)
        constraint = self.constraint(json_schema, regex, grammar, tool_use)
        self.last_stats = GenerationStats()
        return generate_tokens(self.engine, prompt_ids, max_tokens, params, self.stop_ids, self.n_ctx,
                               self.last_stats, constraint, self.prompt_cache)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A plain prompt's tokens: BOS, then the text."""
        return self.tokenizer.encode(prompt, add_bos=True)

    def chat_prompt_ids(self, messages: list[dict], tools: ToolUse | None = None) -> list[int]:
        """A conversation rendered by the model's chat template (which writes BOS itself), ending with
        the assistant's turn; OpenAI's tool calls and `tool` messages in it, and the tools to offer,
        are written as tools.py describes."""
        messages = tools.messages(messages) if tools is not None else history_messages(messages)
        return self.tokenizer.encode(self.chat_template.render(messages), add_bos=False)

    def stream(self, prompt: str, max_tokens: int = 128, stop: list[str] | None = None, **sampling) -> Iterator[str]:
        """Text pieces as they are generated (multi-byte characters never split)."""
        tokens = self.stream_tokens(self.prompt_ids(prompt), max_tokens, **sampling)
        return stream_text(tokens, self.tokenizer, [stop] if isinstance(stop, str) else stop, self.last_stats)

    def generate(self, prompt: str, max_tokens: int = 128, **kwargs) -> str:
        return "".join(self.stream(prompt, max_tokens, **kwargs))

    def fit_chat(self, messages: list[dict], max_tokens: int, tool_use: ToolUse | None = None) -> tuple[list[int], int]:
        """The prompt ids of the conversation once its oldest turns are dropped (never the system
        message, nor the last message) until the prompt and max_tokens fit the context; and how
        many messages were dropped, counted after the system message."""
        system = 1 if messages and messages[0].get("role") == "system" else 0
        dropped = 0
        while True:
            kept = messages[:system] + messages[system + dropped:]
            ids = self.chat_prompt_ids(kept, tool_use)
            if len(ids) + max_tokens <= self.n_ctx or len(kept) <= system + 1:
                return ids, dropped
            dropped += 1
            while system + dropped < len(messages) - 1 and messages[system + dropped].get("role") in ("assistant", "tool"):
                dropped += 1  # a conversation starts with the user's turn

    def stream_chat(self, messages: list[dict], max_tokens: int = 128, stop: list[str] | None = None,
                    tool_use: ToolUse | None = None, **sampling) -> Iterator[str]:
        """When the conversation and max_tokens outgrow the context, its oldest turns are dropped
        (fit_chat) with a warning."""
        ids, dropped = self.fit_chat(messages, max_tokens, tool_use)
        if dropped:
            warnings.warn(f"the conversation outgrew the context of {self.n_ctx} tokens: its oldest {dropped} "
                          f"messages were left out", stacklevel=2)
        tokens = self.stream_tokens(ids, max_tokens, tool_use=tool_use, **sampling)
        return stream_text(tokens, self.tokenizer, [stop] if isinstance(stop, str) else stop, self.last_stats)

    def chat(self, messages: list[dict], max_tokens: int = 128, tools: list[dict] | None = None,
             tool_choice="auto", parallel_tool_calls: bool = True, **kwargs) -> str | AssistantTurn:
        """The reply's text; with `tools` (OpenAI's shape), an AssistantTurn: a reply, or tool calls
        (tool_choice: "none", "auto", "required" or {"type": "function", "function": {"name": ...}})."""
        if tools is None:
            return "".join(self.stream_chat(messages, max_tokens, **kwargs))
        use = ToolUse.choose(tools, tool_choice, parallel_tool_calls)
        text = "".join(self.stream_chat(messages, max_tokens, tool_use=use, **kwargs))
        return parse_envelope(text, kwargs.get("json_schema") is not None) if use.tools else AssistantTurn(text)


DEFAULT_PROMPT_CACHE_MB = 256


def load(model: str | Path | None = None, threads: int | None = None, backend: str = "native",
         n_ctx: int | None = None, head: str | None = None, kv_cache: str = "f16", progress=None,
         prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB, ternary_bits: float | None = None) -> LanguageModel:
    """Load a model directory (or HF repo id in the local cache; None: the shipped default model).

    threads: worker threads for the native backend (default: all cores).
    backend: "native" (C++) or "reference" (NumPy, slow, the oracle).
    n_ctx: the context length to allow (default and maximum: the model's max_position_embeddings).
    head: the output matrix's format for the native backend: None (as stored in the file; a GGUF
          head in quantized blocks becomes q4 or int8, see docs/gguf.md), "f16", "bf16", "f32",
          "int8" (per-row scales; half the bytes of f16) or "q4" (llama.cpp's Q4_0).
    kv_cache: "f16" (default, half the memory) or "f32" keys and values (native backend; the
          reference keeps float32).
    prompt_cache_mb: keys and values of computed tokens kept for later prompts that start with the
          same tokens (a conversation's next turn), least recently used out first; 0 turns it off.
          Each cached position of the model takes layers * 2 * kv_heads * head_dim * 2 bytes
          (f16): 2B4T, about 77 KB, so 256 MB hold some 3,300 positions. Memory is taken as used.
    ternary_bits: the ternary weights in memory as 2 bits each (four to a byte) or 1.6 (five to a
          byte: 20 % fewer bytes to stream per token, more work to decode them); None: the faster
          one on this CPU (`ternlm info` says which). The logits are identical either way.
    """
    path = resolve_model_path(model)
    return load_checkpoint(open_checkpoint(path), threads, backend, n_ctx, head, kv_cache, progress, prompt_cache_mb,
                           ternary_bits)


def load_checkpoint(checkpoint: Checkpoint, threads: int | None = None, backend: str = "native",
                    n_ctx: int | None = None, head: str | None = None, kv_cache: str = "f16",
                    progress=None, prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB,
                    ternary_bits: float | None = None) -> LanguageModel:
    """A LanguageModel from an open checkpoint (e.g. a synthetic one); the other arguments are load()'s."""
    path = Path(checkpoint.source)
    config = checkpoint.config
    checkpoint.check_weights_fit()
    tokenizer = checkpoint.tokenizer()
    return_freed_memory()  # what building it took (a GGUF vocabulary decoded)
    if tokenizer.largest_id >= config.vocab_size:
        raise FormatError(path, f"the tokenizer has the token id {tokenizer.largest_id} but the model's "
                                f"vocab_size is {config.vocab_size}")
    limit = config.max_position_embeddings
    if n_ctx is not None and not 0 < n_ctx <= limit:
        raise ValueError(f"n_ctx must be between 1 and the model's {limit} positions, got {n_ctx}")
    engine = build_engine(checkpoint, backend, threads, progress, head, kv_cache, ternary_bits)
    stop_ids = checkpoint.stop_ids(tokenizer)
    if prompt_cache_mb < 0:
        raise ValueError(f"prompt_cache_mb must be 0 (off) or positive, got {prompt_cache_mb}")
    return LanguageModel(path, engine, tokenizer, stop_ids, n_ctx or limit, backend, prompt_cache_mb,
                         checkpoint.generation_defaults())
