"""Quantization-aware training of ternary BitNet models (needs the `[train]` extra: torch).

    python -m ternlm.train --data texts/ --preset small --steps 2000 --out-dir runs/mine
    torchrun --nproc-per-node 2 -m ternlm.train --data texts/ ...
    python -m ternlm.train --out-dir runs/mine --resume
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m ternlm.train --auto-resume ...   # on each machine; docs/scale-out.md
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """The `ternlm train` command; returns the exit status."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: training needs PyTorch: pip install 'ternlm[train]'", file=sys.stderr)
        return 1
    from ..errors import FormatError
    from . import config as C
    from .data import DataError

    try:
        from .loop import CHECKPOINT, load_checkpoint

        args = C.build_parser().parse_args(argv)
        checkpoint = Path(args.out_dir or C.TrainConfig.out_dir) / CHECKPOINT
        resume = bool(args.resume) or (args.auto_resume and checkpoint.exists())
        saved = load_checkpoint(checkpoint)["train_config"] if resume else None
        config = C.from_args(argv, saved)
        config.resume = config.resume or resume
        config.validate()
        from .loop import train

        train(config)
    except (FormatError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: continue from the last checkpoint with --resume", file=sys.stderr)
        return 130
    return 0
