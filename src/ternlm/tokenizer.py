"""Text <-> token ids with the `tokenizers` library, configured from the model's own files."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import FormatError
from .jsonfile import read_json_object


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None):
        self._tok = tokenizer
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template

    @classmethod
    def from_directory(cls, directory: str | Path, bos_token_id: int | None = None) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FormatError(directory, "no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise FormatError(path, f"cannot read tokenizer: {e}") from None
        config_path = directory / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)}
            template = named.get("default")
        bos = _token_text(config.get("bos_token"))
        if bos is None and bos_token_id is not None:
            bos = tok.id_to_token(bos_token_id)
        return cls(tok, bos, _token_text(config.get("eos_token")),
                   template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def largest_id(self) -> int:
        """The largest token id: ids need not be dense, so it can exceed vocab_size - 1."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Special tokens written in the text (e.g. `<|eot_id|>`) become their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_ends(self, text: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
        """The ids of `encode` and, for each token, the index in `text` of the character after it
        (0 for BOS). Tokens that split a multi-byte character all end after that character."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids, ends = encoding.ids, [end for _, end in encoding.offsets]
        if add_bos and self.bos_id is not None:
            ids, ends = [self.bos_id] + ids, [0] + ends
        return ids, ends

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (what llguidance reads)."""
        return self._tok.to_str()

    def decode_stream(self) -> "StreamDecoder":
        return StreamDecoder(self._tok)


class StreamDecoder:
    """Turns ids into text pieces one at a time; never splits a multi-byte character."""

    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
