"""Constrained decoding: JSON schemas, regular expressions and Lark grammars enforced token by token
with llguidance (the library llama.cpp and vLLM use).

A Grammars object (one per model) compiles what a request asks for into a TokenConstraint, one per
sequence. Before each token is chosen, the constraint sets the logits of every token its grammar does
not allow next to -inf, so any sampler (greedy or not) can only pick an allowed one; the chosen token
then advances it. Once the grammar is complete only the model's stop ids are allowed, and ids beyond
the tokenizer's (a model's vocabulary can be padded past it) never are.

The mask for the next token is computed in a worker thread as soon as a token has been chosen, while
the caller runs the forward pass for the next logits (both release the interpreter lock).
llguidance is imported where it is first needed: importing it takes about 0.1 s.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

# Compact JSON as json.dumps writes it: no whitespace for a weak model to spend tokens on.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Hostile schemas and regular expressions exist (a{100000}, ((a{100}){100}){100}): building a lexer
# runs on LEXER_FUEL (a fifth of llguidance's default: the second example then fails within 0.1 s and
# 50 MB instead of 1.4 s and 250 MB; a 1000-value enum, an e-mail pattern or a date-time format need
# far less), each step's mask on llguidance's default step fuel, and the lexer stops at
# MAX_LEXER_STATES (1-2 kB each) instead of 250,000. Past a limit the matcher fails: before the first
# token, a GrammarError; later, that generation ends with ConstraintFailed.
LEXER_FUEL = 200_000
MAX_LEXER_STATES = 20_000

_mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ternlm-masks")


class GrammarError(ValueError):
    """A JSON schema, regular expression or grammar that cannot be used; the message names the problem."""


class ConstraintFailed(RuntimeError):
    """The grammar's matcher failed while generating (e.g. past its limits): that generation ends."""


def grammar_text(json_schema=None, regex: str | None = None, grammar: str | None = None) -> str | None:
    """llguidance's grammar for at most one of: a JSON schema (a dict, or a pydantic model class), a
    regular expression the whole output must match, or a Lark grammar. None when none is given."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if value is not None]
    if not given:
        return None  # without importing llguidance, whose library takes 4 MB of a plain generation's RSS
    if len(given) > 1:
        raise ValueError(f"give one of json_schema, regex and grammar, not {' and '.join(given)}")
    import llguidance

    if json_schema is not None:
        json_schema = schema_dict(json_schema)
        try:
            text = json.dumps(json_schema)
        except (TypeError, ValueError, RecursionError) as e:  # sets, objects, circular references
            raise GrammarError(f"json_schema is not JSON: {e}") from None
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_STYLE)
    if regex is not None:
        if not isinstance(regex, str):
            raise GrammarError(f"regex must be a string, not {type(regex).__name__}")
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if not isinstance(grammar, str):
        raise GrammarError(f"grammar must be a string (a Lark grammar), not {type(grammar).__name__}")
    return llguidance.LLMatcher.grammar_from_lark(grammar)


def schema_dict(json_schema) -> dict:
    """A JSON schema given as a dict or as a pydantic model class, as a dict."""
    if hasattr(json_schema, "model_json_schema"):
        json_schema = json_schema.model_json_schema()
    if not isinstance(json_schema, dict):
        raise GrammarError(f"json_schema must be a dict (a JSON schema) or a pydantic model class, "
                           f"not {type(json_schema).__name__}")
    return json_schema


class Grammars:
    """Compiles grammars for one model: its tokenizer (the HF `tokenizers` object, also for GGUF
    files), its vocabulary size (the logits' length) and its stop ids."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self._tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def ll_tokenizer(self):
        """llguidance's view of the vocabulary: built once, on first use (about half a second for 128k tokens)."""
        import llguidance

        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.to_json(), n_vocab=self.vocab_size,
                                                            eos_token=self.stop_ids)
            return self._ll_tokenizer

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh sequence's constraint, its first mask computed; raises GrammarError naming the
        problem when the grammar does not compile, or fails at once, within the limits."""
        import llguidance

        limits = llguidance.LLParserLimits(initial_lexer_fuel=LEXER_FUEL, max_lexer_states=MAX_LEXER_STATES,
                                           verbose_errors=False)
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, limits=limits, log_level=0)
        constraint = None if matcher.is_error() else TokenConstraint(matcher, self.vocab_size)
        if matcher.is_error():
            raise GrammarError(_error(matcher))
        return constraint


class TokenConstraint:
    """One sequence's grammar: masks its logits, then advances with the token chosen."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.complete = False  # the grammar can take no more text: only a stop id may follow
        self._allowed: Future[np.ndarray] = Future()
        self._allowed.set_result(self._compute_allowed())

    def _compute_allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next (in the worker thread)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits [vocab] with every token the grammar does not allow next at -inf."""
        allowed = self._allowed.result()
        if self._matcher.is_error():
            raise ConstraintFailed(f"the grammar failed: {_error(self._matcher)}")
        if not allowed.any():
            raise ConstraintFailed("the grammar allows no token here")
        return np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)

    def advance(self, token: int) -> None:
        """The chosen token (one the last mask allowed); then the next mask starts computing. The
        matcher is only touched here and in mask(), never while the worker computes a mask."""
        if not self._matcher.consume_token(token):
            raise ConstraintFailed(f"the grammar refused token {token}: {_error(self._matcher)}")
        self.complete = self._matcher.is_stopped()
        self._allowed = _mask_worker.submit(self._compute_allowed)


def _error(matcher) -> str:
    """The matcher's error message, without the marker llguidance puts where verbose details would be."""
    return matcher.get_error().replace("<non-verbose/>", "").strip()
