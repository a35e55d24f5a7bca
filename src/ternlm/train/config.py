"""Training configuration: one dataclass, filled from a preset, then a TOML file, then flags.

A TOML file holds the training fields at top level and the model's fields (HF config.json
names) in a `[model]` table. Flags: `--field-name value` for every training field and
`--model KEY=VALUE` (repeatable) for model fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import BitNetConfig
from ..errors import FormatError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESETS_DIR = Path(__file__).parent / "presets"


def _field(default, help: str = ""):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: list[str] = _field([], "text files or folders")
    out_dir: str = _field("runs/train", "checkpoints, logs, plots and the exported model")
    preset: str = _field("tiny", "model shape: presets/<name>.toml (tiny, small, base)")
    tokenizer: str | None = _field(None, "a tokenizer.json (or a folder with one); default: a BPE on the data")
    vocab_size: int = _field(4096, "size of the BPE trained on the data")
    heldout_fraction: float = _field(0.05, "held-out tail of each file, by bytes")
    context: int = _field(256, "tokens per training sequence")
    batch_size: int = _field(32, "sequences per optimizer step, all processes together")
    micro_batch: int = _field(8, "sequences per forward pass in one process")
    steps: int = _field(1000, "optimizer steps")
    lr: float = _field(2e-3, "peak learning rate")
    min_lr: float = _field(2e-4, "learning rate at the end of the cosine decay")
    warmup: int = _field(100, "linear warmup steps")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _field(0.9)
    beta2: float = _field(0.95)
    grad_clip: float = _field(1.0, "max gradient norm; 0 = off")
    dtype: str = _field("float32", "float32 | bfloat16 (autocast)")
    quantize: bool = _field(True, "false: plain linears (the fp32 baseline)")
    seed: int = _field(1337)
    threads: int = _field(0, "torch threads per process; 0 = torch's default")
    log_every: int = _field(10, "steps between log lines")
    eval_every: int = _field(250, "steps between held-out evaluations")
    checkpoint_minutes: float = _field(10.0, "minutes between checkpoints")
    init_from: str | None = _field(None, "an HF BitNet directory to start from")
    export_dtype: str = _field("float32", "float32 | bfloat16: embeddings and norms of the export")
    resume: bool = _field(False, "continue from OUT_DIR/checkpoint.pt")
    until_step: int = _field(0, "stop with a checkpoint at this step (e.g. before a time limit)")
    model: dict = _field({}, "model fields (HF config.json names)")

    def model_config(self) -> BitNetConfig:
        raw = dict(self.model)
        raw.setdefault("max_position_embeddings", self.context)
        return BitNetConfig.from_dict(raw, source=f"model config of preset {self.preset!r}")

    def validate(self) -> None:
        def fail(problem):
            raise ValueError(f"config: {problem}")

        if not self.data and not self.resume:
            fail("no training data: give --data FILE_OR_FOLDER")
        if self.dtype not in ("float32", "bfloat16") or self.export_dtype not in ("float32", "bfloat16"):
            fail("dtype and export_dtype must be float32 or bfloat16")
        for name in ("context", "batch_size", "micro_batch", "steps", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive")
        if not 0 <= self.heldout_fraction < 1:
            fail("heldout_fraction must be in [0, 1)")
        if self.warmup < 0 or self.lr <= 0 or self.min_lr < 0:
            fail("warmup, lr, min_lr must not be negative")
        if self.context > self.model_config().max_position_embeddings:
            fail(f"context {self.context} exceeds max_position_embeddings")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(path, "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise FormatError(path, f"not valid TOML: {e}") from None


def _apply(config: TrainConfig, raw: dict, source: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in raw.items():
        if key not in known:
            raise FormatError(source, f"unknown setting {key!r}")
        if key == "model":
            config.model.update(value)
        else:
            setattr(config, key, value)


def preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
        raise FormatError(path, f"no preset {name!r}; presets: {names}")
    return _read_toml(path)


def _parse_value(text: str):
    """A flag value as TOML would read it (numbers, booleans, quoted or bare strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ternlm train", description="Quantization-aware training of a ternary "
                                     "BitNet. Settings come from the preset, then a TOML file, then these flags; the "
                                     "defaults shown are the built-in ones, which a preset or file may change.")
    parser.add_argument("config", nargs="?", help="a TOML file (training fields, [model] table)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field (HF config.json name)")
    parser.add_argument("--from", dest="init_from", metavar="MODEL_DIR",
                        help="start from an HF BitNet checkpoint (fine-tuning)")
    parser.add_argument("--fp32", action="store_const", const=False, dest="quantize",
                        help="plain linears instead of BitLinear (the fp32 baseline)")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from OUT_DIR/checkpoint.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from OUT_DIR/checkpoint.pt if there is one, else start: one command "
                             "for the first start and every start after a failure (docs/scale-out.md)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "init_from", "resume", "quantize"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data":
            parser.add_argument(flag, nargs="+", default=None, help=f.metadata["help"])
        else:
            kind = str if f.type in ("str", "str | None") else _parse_value
            parser.add_argument(flag, type=kind, default=None, help=_with_default(f))
    return parser


def _with_default(f: dataclasses.Field) -> str:
    """The field's help with its built-in default (flags default to None so that presets and files can
    set them: argparse cannot show the default itself)."""
    help = f.metadata["help"]
    if f.default is None or "default" in help:
        return help
    return f"{help} (default: {f.default})" if help else f"default: {f.default}"


def cap_warmup(config: TrainConfig) -> None:
    """A warmup as long as the run would leave the learning rate rising at its last step and never
    decaying (e.g. the default 100 steps with --steps 60): it is cut to a tenth of the run, with a note."""
    if config.warmup >= config.steps:
        capped = config.steps // 10
        print(f"note: a warmup of {config.warmup} steps does not fit a run of {config.steps}; warming up for "
              f"{capped} steps (a tenth of the run) instead", file=sys.stderr)
        config.warmup = capped


def from_args(argv: list[str] | None, saved: dict | None = None) -> TrainConfig:
    """preset < TOML file < flags; when resuming, the run's saved config < flags."""
    args = build_parser().parse_args(argv)
    config = TrainConfig()
    if saved is not None:
        _apply(config, saved, "the checkpoint")
        config.until_step = 0
    else:
        file_raw = _read_toml(Path(args.config)) if args.config else {}
        name = args.preset or file_raw.get("preset") or config.preset
        _apply(config, preset(name), f"preset {name}")
        if args.config:
            _apply(config, file_raw, args.config)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if f.name != "model" and value is not None:
            setattr(config, f.name, value)
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        config.model[key] = _parse_value(value)
    cap_warmup(config)
    return config
