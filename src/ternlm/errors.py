"""Errors users see."""

from __future__ import annotations

from pathlib import Path


class FormatError(ValueError):
    """A model file or directory that ternlm cannot use; the message names the file and the problem."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


class HubError(RuntimeError):
    """A download from (or a lookup in) the Hugging Face Hub failed; the message is one line for the user."""
