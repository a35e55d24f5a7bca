"""PNG charts for `ternlm bench --plot` and `ternlm perplexity --plot` (needs ternlm[plot]: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .bench import BenchResult
from .errors import MissingExtraError


def pyplot():
    """matplotlib.pyplot drawing to files, or a MissingExtraError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("--plot needs matplotlib: pip install 'ternlm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as e:
        raise ValueError(f"cannot write the plot {path}: {e.strerror or e}") from None


def plot_bench(results: list[BenchResult], title: str, path: str | Path) -> None:
    """Two panels: tokens/s against threads (a line per test), and against prompt length (a line
    per thread count; pp tests only)."""
    plt = pyplot()
    fig, (by_threads, by_length) = plt.subplots(1, 2, figsize=(11, 4.2))
    for test, sampling in dict.fromkeys((r.test, r.sampling) for r in results):
        rows = sorted((r for r in results if (r.test, r.sampling) == (test, sampling)), key=lambda r: r.threads)
        label = test if sampling in ("", "greedy") else f"{test}, {sampling}"
        by_threads.plot([r.threads for r in rows], [r.t_s_median for r in rows], marker="o", label=label)
    by_threads.set(xlabel="threads", ylabel="tokens/s (median)", title="by thread count")
    by_threads.set_xticks(sorted({r.threads for r in results}))
    prompts = [r for r in results if r.kind == "pp"]
    for threads in sorted({r.threads for r in prompts}):
        rows = sorted((r for r in prompts if r.threads == threads), key=lambda r: r.tokens)
        by_length.plot([r.tokens for r in rows], [r.t_s_median for r in rows], marker="o",
                       label=f"{threads} thread{'s' if threads > 1 else ''}")
    by_length.set(xlabel="prompt tokens", ylabel="prompt tokens/s (median)", title="by prompt length")
    if not prompts:
        by_length.text(0.5, 0.5, "no prompt tests (-p)", ha="center", va="center", transform=by_length.transAxes)
    for axes in (by_threads, by_length):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_window_losses(window_losses: list[float], n_ctx: int, title: str, path: str | Path) -> None:
    """The mean loss of each window's scored half, with the mean over all of them."""
    plt = pyplot()
    fig, axes = plt.subplots(figsize=(9, 4))
    windows = range(1, len(window_losses) + 1)
    axes.plot(windows, window_losses, marker="o" if len(window_losses) <= 60 else None, label="window")
    mean = sum(window_losses) / len(window_losses)
    axes.axhline(mean, color="gray", linestyle="--", label=f"mean {mean:.3f}")
    axes.set(xlabel=f"window ({n_ctx} tokens each)", ylabel="loss of the scored half (nats/token)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    _save(fig, path)
    plt.close(fig)
