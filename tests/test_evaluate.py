"""The lm-evaluation-harness adapter, end to end through lm_eval's own command line, on local tasks
built from held-out Hamlet (no task data can be downloaded here). Every number lm_eval reports is
recomputed with NumPy from `m.logits`, and every generation with `m.generate`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import numpy_log_probs

pytestmark = pytest.mark.slow  # lm-evaluation-harness
pytest.importorskip("lm_eval", reason="pip install 'ternlm[eval]'")

HELDOUT = Path(__file__).parent / "data" / "hamlet_heldout.txt"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# a choice, a rolling document and a generation task: lm_eval's three request types
TASKS = {
    "hamlet_next_line": """\
task: hamlet_next_line
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/next_line.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: "\\n"
metric_list:
  - metric: acc
    higher_is_better: true
""",
    "hamlet_speeches": """\
task: hamlet_speeches
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/speeches.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    higher_is_better: false
""",
    "hamlet_continue": """\
task: hamlet_continue
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/next_line.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}\\n"
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list:
  - metric: exact_match
    higher_is_better: true
""",
}


def verse_lines() -> list[str]:
    return [line for line in HELDOUT.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.endswith(":") and not line.startswith("[")]


def next_line_docs(n: int = 24) -> list[dict]:
    """A line of verse, its true successor and three lines from elsewhere; the answer's place rotates."""
    lines = verse_lines()
    docs = []
    for i in range(n):
        start = 5 * i
        others = [lines[(start + 40 + 29 * k) % len(lines)] for k in range(3)]
        gold = i % 4
        docs.append({"context": lines[start], "choices": others[:gold] + [lines[start + 1]] + others[gold:], "gold": gold})
    return docs


def speech_docs() -> list[dict]:
    """Eight speeches of 4 to 44 lines: the longest outgrow the model's 256 tokens (rolling windows)."""
    lines = verse_lines()
    return [{"text": "\n".join(lines[20 * i:20 * i + 4 + 6 * i])} for i in range(8)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("next_line", next_line_docs()), ("speeches", speech_docs())):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    for name, template in TASKS.items():
        (folder / f"{name}.yaml").write_text(template.format(folder=folder), encoding="utf-8")
    return folder


def continuation_logprob(model, context: str, continuation: str) -> float:
    """log p(continuation | BOS context), its tokens being those that the whole adds to the context."""
    context_ids = model.tokenizer.encode(context)
    whole = model.tokenizer.encode(context + continuation)
    lp = numpy_log_probs(model, whole[:-1])
    return float(sum(lp[j - 1, whole[j]] for j in range(len(context_ids), len(whole))))


def rolling_logprob(model, text: str) -> float:
    """Each token predicted once: a first window from BOS, then windows of full context that predict
    only the tokens not yet predicted."""
    tokens = model.tokenizer.encode(text, add_bos=False)
    n = model.n_ctx
    lp = numpy_log_probs(model, [model.tokenizer.bos_id] + tokens[:n - 1])
    total = float(sum(lp[j, tokens[j]] for j in range(min(n, len(tokens)))))
    done = n
    while done < len(tokens):
        end = min(done + n, len(tokens))
        inputs = tokens[end - n - 1:end - 1]          # the n tokens before each of the predicted ones
        lp = numpy_log_probs(model, inputs)
        total += float(sum(lp[j - (end - n), tokens[j]] for j in range(done, end)))
        done = end
    return total


def test_local_tasks_through_lm_evals_own_cli(task_folder, default_model, tmp_path):
    model = default_model
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "ternlm.evaluate", "run", "--model", "ternlm", "--model_args", "threads=1",
         "--tasks", "hamlet_next_line,hamlet_speeches,hamlet_continue", "--include_path", str(task_folder),
         "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    docs = next_line_docs()
    correct = [int(np.argmax([continuation_logprob(model, d["context"], "\n" + c) for c in d["choices"]])) == d["gold"]
               for d in docs]
    assert results["hamlet_next_line"]["acc,none"] == pytest.approx(np.mean(correct))
    assert 0.25 < np.mean(correct)  # better than chance: the model knows some Hamlet-like verse

    speeches = [d["text"] for d in speech_docs()]
    assert max(len(model.tokenizer.encode(t)) for t in speeches) > model.n_ctx  # rolling windows were needed
    total = sum(rolling_logprob(model, t) for t in speeches)
    n_bytes = sum(len(t.encode("utf-8")) for t in speeches)
    assert results["hamlet_speeches"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)

    (samples_file,) = out.rglob("samples_hamlet_continue_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(docs)
    for sample in samples:
        expected = model.generate(sample["doc"]["context"] + "\n", max_tokens=12, stop=["\n"], temperature=0)
        assert sample["resps"][0][0] == expected


def test_ternlm_eval_runs_lm_evals_evaluator(task_folder):
    result = subprocess.run([sys.executable, "-m", "ternlm.cli", "eval", "--tasks", "hamlet_next_line", "-t", "1",
                             "--include-path", str(task_folder), "--limit", "8", "-o", "json"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    assert set(results) == {"hamlet_next_line"} and 0 <= results["hamlet_next_line"]["acc,none"] <= 1

    unknown = subprocess.run([sys.executable, "-m", "ternlm.cli", "eval", "--tasks", "no_such_task",
                              "--include-path", str(task_folder)],
                             capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "ternlm: error: unknown task no_such_task" in unknown.stderr
