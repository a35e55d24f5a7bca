"""A short run of bench/load_test.py against a real `ternlm serve` process: 16 clients for 20 s,
normal, streamed, dropped, garbage and oversized requests mixed. Every answer must be one the API
documents, no slot may stay in use, and the server's memory must stay flat (docs/reliability.md has
the full run: 64 clients for 2 minutes)."""

from __future__ import annotations

import pytest

from bench.load_test import KINDS, failures, run

pytestmark = pytest.mark.slow  # 16 clients for 20 s
pytest.importorskip("fastapi", reason="needs the serve extra")


def test_short_load_run_has_only_documented_answers_and_no_stuck_slot():
    summary = run(clients=16, seconds=20)
    assert failures(summary, rss_tolerance_mb=48) == []
    answered = {key.split()[0] for key in summary["statuses"]}
    assert answered == set(KINDS), summary["statuses"]
    assert summary["statuses"].get("completion 200", 0) > 0 and summary["statuses"].get("chat_stream 200", 0) > 0
