"""lm-evaluation-harness adapter (needs ternlm[eval]). Importing this module registers the model
class `ternlm` in lm_eval's registry.

    ternlm eval -m MODEL --tasks arc_easy,hellaswag                      # lm_eval's evaluator, ternlm's flags
    python -m ternlm.evaluate --model ternlm --model_args pretrained=MODEL --tasks arc_easy   # lm_eval's own CLI

lm_eval 0.4 finds model classes only in its own registry (no entry-point plugins), so a bare
`lm_eval --model ternlm` cannot see this class: `python -m ternlm.evaluate` is lm_eval's command
line with it registered, taking every lm_eval flag.

Model arguments (`--model_args`): pretrained (an HF directory, GGUF file or cached repo id; default:
the shipped model), threads, backend, ctx, head, kv_cache, seed (for sampled generations).

How requests run:
- loglikelihood: the context is run once into a KV cache and its last logits score the first token of
  every continuation that shares it (multiple choice: all the choices); a longer continuation then
  runs from the cached context (positions are rewritten, never copied). A pair longer than the
  context loses tokens from the left of its context, as lm_eval's HF model does.
- loglikelihood_rolling: lm_eval's own rolling windows (each token predicted once, BOS first), each
  window scored as above.
- generate_until: `batch_size` prompts decode together, one token each per engine.forward_batch step.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .errors import MissingExtraError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise MissingExtraError("the lm-evaluation-harness adapter needs lm_eval: pip install 'ternlm[eval]'") from None

from .api import LanguageModel, load
from .generate import ContextOverflowError, GenerationState, TextStream, prefill
from .perplexity import log_softmax
from .progress import progress_bar


@register_model("ternlm")
class TernLM(TemplateLM):
    def __init__(self, pretrained: str | LanguageModel | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None, threads: int | None = None,
                 backend: str = "native", ctx: int | None = None, head: str | None = None, kv_cache: str = "f16",
                 seed: int = 1234):
        super().__init__()  # device is ignored: lm_eval's CLI passes cuda:0 by default, ternlm runs on the CPU
        if isinstance(pretrained, LanguageModel):
            self.model = pretrained
        else:
            self.model = load(pretrained, threads=threads, backend=backend, n_ctx=ctx, head=head, kv_cache=kv_cache)
        # "auto" asks lm_eval's HF model to probe GPU memory; here a batch only widens generation steps
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else (max_batch_size or 8)
        self.rng = np.random.default_rng(seed)

    @property
    def engine(self):
        return self.model.engine

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path)

    @property
    def max_length(self) -> int:
        return self.model.n_ctx

    @property
    def eot_token_id(self) -> int:
        tokenizer = self.model.tokenizer
        return tokenizer.eos_id if tokenizer.eos_id is not None else min(self.model.stop_ids)

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS first (the model's own convention) unless asked not to, or the string starts with it."""
        tokenizer = self.model.tokenizer
        bos_text = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
        add_bos = add_special_tokens is not False and not (bos_text and string.startswith(bos_text))
        return tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens) -> str:
        return self.model.tokenizer.decode(tokens)

    # -- loglikelihood ----------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation[:-1] fits in the model."""
        if len(continuation) > self.max_length:
            raise ContextOverflowError(f"a continuation of {len(continuation)} tokens exceeds the context of "
                                       f"{self.max_length}")
        return context[max(0, len(context) + len(continuation) - 1 - self.max_length):]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context text, continuation text) or None, context ids, continuation ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            by_context[tuple(self._fit(context, continuation))].append(i)
        with progress_bar(enabled=not disable_tqdm) as progress:
            task = progress.add_task("loglikelihood", total=len(requests))
            for context, members in by_context.items():
                cache = self.engine.new_cache(len(context) + max(len(requests[i][2]) for i in members) - 1)
                first_logits = prefill(self.engine, cache, list(context))  # predicts every continuation's first token
                for i in members:
                    key, _, continuation = requests[i]
                    logits = first_logits[None]
                    if len(continuation) > 1:
                        rest = self.engine.forward(cache, continuation[:-1], len(context), all_logits=True)
                        logits = np.concatenate([logits, rest])
                    log_probs = log_softmax(logits)
                    targets = np.asarray(continuation)
                    results[i] = (float(log_probs[np.arange(len(targets)), targets].sum()),
                                  bool((log_probs.argmax(axis=1) == targets).all()))
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, results[i])
                    progress.advance(task)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        with progress_bar(enabled=not disable_tqdm) as progress:
            task = progress.add_task("loglikelihood_rolling", total=len(requests))
            for request in requests:
                (text,) = request.args
                windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                    context_len=1)
                scores = self._loglikelihood_tokens([(None, *make_disjoint_window(w)) for w in windows],
                                                    disable_tqdm=True)
                results.append(sum(logprob for logprob, _ in scores))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
                progress.advance(task)
        return results

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        with progress_bar(enabled=not disable_tqdm) as progress:
            task = progress.add_task("generate_until", total=len(requests))
            for start in range(0, len(requests), self.batch_size):
                batch = [request.args for request in requests[start:start + self.batch_size]]
                for (context, gen_kwargs), text in zip(batch, self._generate_batch(batch)):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    progress.advance(task)
        return results

    def _generate_batch(self, batch: list[tuple[str, dict]]) -> list[str]:
        """Prefills each prompt, then decodes all unfinished ones together, a token each step."""
        sequences = [_Generation(self, context, gen_kwargs) for context, gen_kwargs in batch]
        logits = [prefill(self.engine, s.cache, s.prompt) for s in sequences]
        active = list(range(len(sequences)))
        while active:
            stepping = [i for i in active if sequences[i].step(logits[i])]
            if not stepping:
                break
            step_logits = self.engine.forward_batch([sequences[i].next_segment() for i in stepping])
            for i, row in zip(stepping, step_logits):
                logits[i] = row
            active = stepping
        return [s.text for s in sequences]


class _Generation:
    """One generate_until request: its prompt and cache, and the shared generation code's state
    (sampling, stop ids, max_tokens) and text stream (lm_eval's `until` strings)."""

    def __init__(self, lm: TernLM, context: str, gen_kwargs: dict):
        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
        max_tokens = kwargs["max_gen_toks"]
        until = [s for s in handle_stop_sequences(kwargs["until"], eos=lm.tok_decode([lm.eot_token_id])) if s]
        # lm_eval's settings, then the model's generation_config.json (as transformers merges them)
        params = lm.model.sampling(temperature=float(kwargs.get("temperature", 0.0)), top_k=kwargs.get("top_k"),
                                   top_p=kwargs.get("top_p"), seed=int(lm.rng.integers(1 << 63)))
        n_ctx = lm.max_length
        # keep room for the answer: the prompt loses tokens from the left, as in lm_eval's HF model
        self.prompt = lm.tok_encode(context)[-max(n_ctx - max(max_tokens, 1), 1):]
        self.state = GenerationState(self.prompt, max_tokens, params, lm.model.stop_ids, n_ctx)
        self.cache = lm.engine.new_cache(self.state.n_positions)
        self.stream = TextStream(lm.model.tokenizer, until)
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def step(self, logits: np.ndarray) -> bool:
        """Samples the next token; True if the sequence goes on (its token must then be run)."""
        if self.state.finished:
            return False
        token = self.state.next_token(logits)
        if token is not None:
            self.pieces.append(self.stream.push(token))
        if self.stream.stopped:
            return False
        if self.state.finished:
            self.pieces.append(self.stream.flush())
            return False
        return True

    def next_segment(self) -> tuple:
        """(cache, tokens, start position) of the token just sampled, for engine.forward_batch."""
        history = self.state.history
        return self.cache, history[-1:], len(history) - 1


def run_tasks(model: LanguageModel, tasks: list[str], include_path: str | None = None, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 1, seed: int = 1234) -> dict:
    """lm_eval's evaluator on `tasks` (names, groups or tags; `include_path` adds a folder of task YAMLs)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # indexing lm_eval's thousands of built-in task files takes seconds: local tasks alone skip it
    task_manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if task_manager is None or not set(tasks) <= set(task_manager.all_tasks):
        task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)} (lm_eval ls tasks lists them; local YAML files need --include-path)")
    return simple_evaluate(model=TernLM(model, batch_size=batch_size, seed=seed), tasks=tasks, num_fewshot=num_fewshot,
                           limit=limit, task_manager=task_manager, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)


def main() -> None:
    """lm_eval's command line, with the `ternlm` model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
