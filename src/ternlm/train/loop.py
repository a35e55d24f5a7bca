"""The training loop: single process, or data-parallel under `torchrun` (gloo on CPU, nccl on GPU).

One optimizer step sees `batch_size` sequences in all: each of the `world` processes runs
batch_size / (world * micro_batch) micro-batches and DDP averages the gradients.
Checkpoints (`OUT_DIR/checkpoint.pt`) hold plain state dicts only and are read with
`torch.load(weights_only=True)`; batches depend only on (seed, step), so `--resume` continues
exactly where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer

from ..config import BitNetConfig
from ..errors import FormatError
from ..perplexity import bits_per_byte
from . import data as D
from .config import TrainConfig
from .export import export_hf, load_hf
from .model import BitNet

CHECKPOINT = "checkpoint.pt"


# -- distributed ----------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def all_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


# -- schedule and optimizer -----------------------------------------------------------------
def learning_rate(step: int, c: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: BitNet, c: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (linears, embedding), none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2))


# -- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: BitNet, heldout: D.HeldOut, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
    """Held-out loss: mean nats per token and bits per UTF-8 byte (see data.py for the protocol)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(rank * micro_batch, len(heldout.inputs), world * micro_batch):
        x = torch.from_numpy(heldout.inputs[start:start + micro_batch])                # (b, T)
        y = torch.from_numpy(heldout.targets[start:start + micro_batch])               # (b, T)
        logits, _ = model(x)                                                           # (b, T, vocab)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                 reduction="sum").item()
    model.train(was_training)
    (total,) = all_sum([total], world)
    return {"loss": total / max(heldout.n_tokens, 1), "bpb": bits_per_byte(total, max(heldout.n_bytes, 1))}


# -- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: BitNet, optimizer, step: int, c: TrainConfig, history: dict) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(c),
        "model_config": model.config.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save leaves the previous checkpoint intact
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(path, "no checkpoint to resume from") from None
    except Exception as e:  # torch raises many kinds on truncated or foreign files
        raise FormatError(path, f"corrupt or not a ternlm checkpoint ({type(e).__name__}: {e})") from None
    missing = {"step", "model", "optimizer", "train_config", "model_config"} - set(state)
    if missing:
        raise FormatError(path, f"not a ternlm checkpoint (missing {', '.join(sorted(missing))})")
    return state


# -- plots ----------------------------------------------------------------------------------
def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, label="train loss", lw=1)
    if history["heldout"]:
        steps, losses, _ = zip(*history["heldout"])
        ax.plot(steps, losses, "o-", label="held-out loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run --------------------------------------------------------------------------------
def prepare_tokenizer(c: TrainConfig, out_dir: Path, train_texts: list[str], rank: int, world: int) -> Tokenizer:
    """Reuses OUT_DIR/tokenizer.json if present (resume); rank 0 writes it, the others read it."""
    saved = out_dir / "tokenizer.json"
    if rank == 0 and not saved.exists():
        source = c.init_from if c.init_from and not c.tokenizer else c.tokenizer
        D.load_or_train_tokenizer(source, train_texts, c.vocab_size).save(str(saved))
    if world > 1:
        dist.barrier()
    return D.load_or_train_tokenizer(saved, train_texts, c.vocab_size)


def train(c: TrainConfig, console: Console | None = None) -> dict:
    """Runs (or resumes) training; returns the history with the final held-out result."""
    rank, world = setup_distributed()
    console = console or Console(soft_wrap=True)
    say = console.print if rank == 0 else (lambda *a, **k: None)
    if c.threads:
        torch.set_num_threads(c.threads)
    out_dir = Path(c.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_step = c.batch_size // (world * c.micro_batch)
    if per_step * world * c.micro_batch != c.batch_size:
        raise ValueError(f"config: batch_size {c.batch_size} is not a multiple of "
                         f"processes ({world}) x micro_batch ({c.micro_batch})")

    resume_state = load_checkpoint(out_dir / CHECKPOINT) if c.resume else None
    train_texts, heldout_texts = D.read_corpus(c.data, c.heldout_fraction)
    tokenizer = prepare_tokenizer(c, out_dir, train_texts, rank, world)
    stream = D.train_stream(tokenizer, train_texts)
    heldout = D.heldout_windows(tokenizer, heldout_texts, c.context)

    if resume_state is not None:
        model_config, init_state = BitNetConfig.from_dict(resume_state["model_config"], "checkpoint"), None
    elif c.init_from:
        model_config, init_state = load_hf(c.init_from)
    else:
        model_config, init_state = c.model_config(), None
        model_config.vocab_size = tokenizer.get_vocab_size()
    model_config.max_position_embeddings = max(model_config.max_position_embeddings, c.context)
    ids = D.special_ids(tokenizer)
    model_config.bos_token_id, model_config.eos_token_id = ids[D.BOS], [ids[D.EOS], ids[D.EOT]]
    if model_config.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"config: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                         f"only {model_config.vocab_size}")

    torch.manual_seed(c.seed)
    model = BitNet(model_config, quantize=c.quantize)
    if init_state is not None:
        model.load_state_dict(init_state)
    optimizer = make_optimizer(model, c)
    history = {"losses": [], "train": [], "heldout": []}
    step = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["torch_rng"])
        history = resume_state["history"]
        step = resume_state["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    net = ddp or model
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if c.dtype == "bfloat16" else nullcontext()

    say(f"[bold]ternlm train[/]: {model.num_params() / 1e6:.2f} M parameters "
        f"({'ternary' if c.quantize else 'fp32 baseline'}), vocab {tokenizer.get_vocab_size()}, "
        f"{len(stream):,} training tokens, {heldout.n_tokens:,} held-out tokens "
        f"({heldout.n_bytes:,} bytes), {world} process(es), step {step}/{c.steps}")
    stop = min(c.steps, c.until_step) if c.until_step else c.steps
    tokens_per_step = c.batch_size * c.context
    last_save = time.monotonic()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                        TimeRemainingColumn(), console=console, disable=rank != 0)
    with progress:
        task = progress.add_task("train", total=c.steps, completed=step, loss=float("nan"), tps=0.0)
        t0, window_loss, window_steps = time.monotonic(), 0.0, 0
        while step < stop:
            lr = learning_rate(step, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = D.batch_offsets(c.seed, step, c.batch_size, len(stream), c.context)
            mine = offsets[rank * per_step * c.micro_batch:(rank + 1) * per_step * c.micro_batch]
            step_loss = 0.0
            for micro in range(per_step):
                x, y = D.windows(stream, mine[micro * c.micro_batch:(micro + 1) * c.micro_batch], c.context)
                sync = nullcontext() if ddp is None or micro == per_step - 1 else ddp.no_sync()
                with sync:
                    with autocast():
                        _, loss = net(torch.from_numpy(x), torch.from_numpy(y))
                    (loss / per_step).backward()
                step_loss += loss.item() / per_step
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            (step_loss,) = all_sum([step_loss / world], world)
            step += 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            history["losses"].append(step_loss)

            tps = tokens_per_step * window_steps / max(time.monotonic() - t0, 1e-9)
            progress.update(task, completed=step, loss=step_loss, tps=tps)
            if step % c.log_every == 0 or step == stop:
                history["train"].append((step, window_loss / window_steps))
                if not console.is_terminal:
                    say(f"step {step}/{c.steps}  loss {window_loss / window_steps:.4f}  lr {lr:.2e}  "
                        f"{tps:,.0f} tok/s")
                t0, window_loss, window_steps = time.monotonic(), 0.0, 0
            if (step % c.eval_every == 0 or step == c.steps) and heldout.n_tokens:
                result = evaluate(model, heldout, c.micro_batch, rank, world)
                history["heldout"].append((step, result["loss"], result["bpb"]))
                say(f"step {step}: held-out loss {result['loss']:.4f} nats/token, {result['bpb']:.4f} bits/byte")
                if rank == 0:
                    plot_losses(history, out_dir / "loss.png")
            due = time.monotonic() - last_save >= c.checkpoint_minutes * 60
            if rank == 0 and (due or step == stop):
                save_checkpoint(out_dir / CHECKPOINT, model, optimizer, step, c, history)
                last_save = time.monotonic()

    if rank == 0:
        plot_losses(history, out_dir / "loss.png")
        (out_dir / "history.json").write_text(json.dumps(history) + "\n")
        if step == c.steps and c.quantize:
            path = export_hf(model, tokenizer, out_dir / "model", c.export_dtype)
            say(f"exported the model to {path}")
    if world > 1:
        dist.barrier()
    return history
