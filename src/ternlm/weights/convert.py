"""Writers: any checkpoint ternlm reads -> GGUF (I2_S, TQ2_0 or TQ1_0), and GGUF -> HF directory.

One tensor is converted at a time: the GGUF header (which needs every tensor's type, shape and
size) is written first, then each tensor's bytes as they are produced.

Architecture names written:
- I2_S: `bitnet-b1.58` for relu2 BitNet (what bitnet.cpp reads for 2B4T), `bitnet` for SiLU
  BitNet, `llama` for LLaMA-architecture ternary models.
- TQ1_0 / TQ2_0: `bitnet` (the only BitNet name upstream llama.cpp knows) or `llama`. llama.cpp's
  `bitnet` graph computes SiLU, so relu2 models run wrongly there; the `ternlm.hidden_act` key,
  always written, makes ternlm (and anyone who reads it) compute the right activation.
`llama` files get llama.cpp's q/k row order (names.permute_rope_rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf import quants as gguf_quants

from ..config import BitNetConfig
from ..errors import FormatError
from ..hub import resolve_model_path
from . import open_checkpoint
from .checkpoint import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Checkpoint, float32_of, layer_norms,
                         linear_name, linear_shape, norm_name)
from .gguf import HIDDEN_ACT_KEY, GGUFCheckpoint
from .gguf_ternary import I2_S, TQ1_0, TQ2_0, pack_i2_s, pack_tq1_0, pack_tq2_0, ternary_nbytes
from .gguf_tokenizer import GPT2_PRE, LLAMA3_PATTERN, gguf_hf_tokenizer
from .hf import HFCheckpoint
from .names import gguf_name, permute_rope_rows
from .packing import pack_ternary_hf

TERNARY_TYPES = {"i2_s": (I2_S, pack_i2_s), "tq2_0": (TQ2_0, pack_tq2_0), "tq1_0": (TQ1_0, pack_tq1_0)}
# head / embedding types: every one gguf.quants can write, plus Q6_K (quantize_q6_k below)
HEAD_TYPES = {name.lower(): GGMLQuantizationType[name]
              for name in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")}
FILE_TYPES = {TQ1_0: LlamaFileType.MOSTLY_TQ1_0, TQ2_0: LlamaFileType.MOSTLY_TQ2_0}


def open_source(path: Path) -> Checkpoint:
    """An HF directory, a GGUF file, or an HF repo id in the local cache."""
    checkpoint = open_checkpoint(resolve_model_path(path))
    checkpoint.check_weights_fit()
    return checkpoint


def _architecture(config: BitNetConfig, ternary_type: int) -> str:
    if not config.has_sub_norms:
        return "llama"
    if ternary_type == I2_S and config.hidden_act == "relu2":
        return "bitnet-b1.58"
    return "bitnet"


def _tensor_plan(checkpoint: Checkpoint, ternary_type: int, head_type: GGMLQuantizationType):
    """[(gguf name, HF name, kind, [rows, cols], ggml type)] in the order written."""
    config = checkpoint.config
    vocab, hidden = config.vocab_size, config.hidden_size
    plan = [("model.embed_tokens.weight", "dense", (vocab, hidden), head_type)]
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", "dense", (vocab, hidden), head_type))
    plan.append(("model.norm.weight", "norm", (hidden,), GGMLQuantizationType.F32))
    for layer in range(config.num_hidden_layers):
        for norm in layer_norms(config):
            size = config.intermediate_size if norm == "ffn_sub_norm" else hidden
            plan.append((norm_name(layer, norm), "norm", (size,), GGMLQuantizationType.F32))
        for projection in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            plan.append((linear_name(layer, projection), "ternary", linear_shape(config, projection), ternary_type))
    return [(gguf_name(hf), hf, kind, shape, qtype) for hf, kind, shape, qtype in plan]


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    n = int(np.prod(shape))
    if qtype in (I2_S, TQ1_0, TQ2_0):
        return ternary_nbytes(qtype, n)
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return n // block * block_bytes


def convert_to_gguf(source: str | Path, destination: str | Path, ternary: str = "i2_s", head: str = "f16",
                    progress=None) -> Path:
    """Write SOURCE (HF directory or GGUF file) as a GGUF file with ternary weights of type
    `ternary`, and embedding and output matrix (when untied) of type `head`."""
    if ternary not in TERNARY_TYPES:
        raise ValueError(f"unknown ternary type {ternary!r}; choose one of {', '.join(TERNARY_TYPES)}")
    if head not in HEAD_TYPES:
        raise ValueError(f"unknown head type {head!r}; choose one of {', '.join(HEAD_TYPES)}")
    checkpoint = open_source(Path(source))
    config = checkpoint.config
    if config.rope_scaling:
        raise FormatError(checkpoint.source, "RoPE scaling cannot be written to GGUF by ternlm yet")
    ternary_type, pack = TERNARY_TYPES[ternary]
    head_type = HEAD_TYPES[head]
    arch = _architecture(config, ternary_type)
    plan = _tensor_plan(checkpoint, ternary_type, head_type)
    _check_block_sizes(plan, checkpoint.source)

    destination = Path(destination)
    if destination.exists() and destination.resolve() == Path(source).resolve():
        raise ValueError(f"{destination}: the destination is the source file")
    # written under a temporary name: a failed conversion never leaves a plausible-looking file
    partial = destination.with_name(destination.name + ".partial")
    writer = GGUFWriter(partial, arch)
    try:
        _write_config(writer, arch, config, ternary_type, Path(source).name)
        _write_tokenizer(writer, checkpoint)
        for name, _, _, shape, qtype in plan:
            # logical shape + raw type id: GGUFWriter only stores them (it knows no I2_S size)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, hf_name, kind, shape, qtype) in enumerate(plan, 1):
            writer.write_tensor_data(_tensor_data(checkpoint, arch, pack, hf_name, kind, shape, qtype))
            if progress:
                progress(done, len(plan))
        writer.close()
        partial.replace(destination)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return destination


def _tensor_data(checkpoint: Checkpoint, arch: str, pack, hf_name: str, kind: str, shape, qtype) -> np.ndarray:
    if kind == "ternary":
        weights, scale = checkpoint.ternary(hf_name, *shape)
        projection = hf_name.split(".")[-2]
        if arch == "llama" and projection in ("q_proj", "k_proj"):
            config = checkpoint.config
            heads = config.num_attention_heads if projection == "q_proj" else config.num_key_value_heads
            weights = permute_rope_rows(weights, heads)
        return pack(weights, scale)
    if kind == "norm":
        return checkpoint.norm(hf_name, shape[0])
    return _dense_as(checkpoint, hf_name, GGMLQuantizationType(qtype))


def _check_block_sizes(plan, source: str) -> None:
    for name, _, _, shape, qtype in plan:
        block = 128 if qtype == I2_S else GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]
        width = int(np.prod(shape)) if qtype == I2_S else shape[-1]
        if width % block:
            type_name = "I2_S" if qtype == I2_S else GGMLQuantizationType(qtype).name
            raise FormatError(source, f"{name} {list(shape)}: {type_name} needs multiples of {block} "
                                      f"({'weights' if qtype == I2_S else 'columns'})")


def _dense_as(checkpoint: Checkpoint, name: str, qtype: GGMLQuantizationType) -> np.ndarray:
    """A dense matrix in the GGUF type, a slab of rows at a time (the 2B4T embedding is 1.3 GB in f32)."""
    tensor = checkpoint.dense(name)
    rows = tensor.array.shape[0]
    if qtype == GGMLQuantizationType.BF16 and tensor.dtype == "bfloat16":
        return np.ascontiguousarray(tensor.array)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = tensor.array.shape[1]
    out = np.empty((rows, cols // block * block_bytes), dtype=np.uint8)
    step = max(1, (1 << 22) // cols)
    for start in range(0, rows, step):
        values = float32_of(type(tensor)(tensor.array[start: start + step], tensor.dtype))
        quantized = quantize_q6_k(values) if qtype == GGMLQuantizationType.Q6_K else gguf_quants.quantize(values, qtype)
        out[start: start + step] = np.ascontiguousarray(quantized).view(np.uint8).reshape(len(values), -1)
    if qtype == GGMLQuantizationType.F16:
        return out.view(np.float16)
    if qtype == GGMLQuantizationType.F32:
        return out.view(np.float32)
    return out


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q6_K blocks (gguf-py only decodes them), as llama.cpp's
    quantize_row_q6_K_ref: per 16 weights a 6-bit code scale chosen by a weighted least-squares
    search (make_qx_quants), the 16 scales of a 256-weight block as int8 times one f16."""
    x = np.asarray(values, dtype=np.float32).reshape(-1, 16, 16)  # [block, sub-block, weight]
    sub_scales = _best_scales(x, 32)
    biggest = np.take_along_axis(sub_scales, np.abs(sub_scales).argmax(axis=1)[:, None], axis=1)[:, 0]
    with np.errstate(divide="ignore"):
        inverse = np.where(np.abs(biggest) < 1e-15, 0, -128 / biggest).astype(np.float32)
        d = np.where(inverse == 0, 0, 1 / inverse).astype(np.float16)
    scales = np.minimum(127, np.rint(inverse[:, None] * sub_scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * scales  # [block, sub-block]
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(step[..., None] != 0, np.clip(np.rint(x / step[..., None]), -32, 31), 0)
    codes = (levels + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # weight 128h + 32k + l
    low, high = codes & np.uint8(15), codes >> np.uint8(4)
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << np.uint8(4)), low[:, :, 1] | (low[:, :, 3] << np.uint8(4))], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << np.uint8(4)) | (high[:, :, 3] << np.uint8(6))
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.view(np.uint8),
                             d.astype("<f2").view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(values.shape[0], -1)


def _best_scales(x: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's make_qx_quants (weights x², rmse_type 1) for every group of x's last axis at once:
    try 19 grid scales around -nmax/max and keep the least-squares scale of the best one."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    weight = x * x
    best_scale = best = None
    for nudge in [0] + [n for n in range(-9, 10) if n]:
        with np.errstate(divide="ignore", invalid="ignore"):
            levels = np.clip(np.rint(-(nmax + 0.1 * nudge) / peak[..., None] * x), -nmax, nmax - 1)
        sum_lx = np.sum(weight * x * levels, axis=-1)
        sum_l2 = np.sum(weight * levels * levels, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(sum_l2 > 0, sum_lx / sum_l2, 0)
        if best is None:
            best_scale, best = scale, scale * sum_lx
        else:
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            best_scale, best = np.where(better, scale, best_scale), np.where(better, scale * sum_lx, best)
    return np.where(np.abs(peak) < 1e-15, 0, best_scale).astype(np.float32)


def _write_config(writer: GGUFWriter, arch: str, config: BitNetConfig, ternary_type: int, name: str) -> None:
    writer.add_name(name)
    writer.add_quantization_version(2)
    if ternary_type in FILE_TYPES:
        writer.add_file_type(FILE_TYPES[ternary_type])
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_uint32(f"{arch}.attention.key_length", config.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", config.head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
    writer.add_string(HIDDEN_ACT_KEY, config.hidden_act)


# -- tokenizer metadata ------------------------------------------------------------------------
_TOKENIZER_KEYS_WRITTEN = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id",
                           "tokenizer.ggml.eot_token_id", "tokenizer.chat_template"}


def _write_tokenizer(writer: GGUFWriter, checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer()
    if isinstance(checkpoint, GGUFCheckpoint):
        # the source's own vocabulary, as stored; ids and template are written below
        for key, entry in checkpoint.file.metadata().items():
            if key.startswith("tokenizer.") and key not in _TOKENIZER_KEYS_WRITTEN:
                sub = None if entry.element_type is None else GGUFValueType(entry.element_type)
                writer.add_key_value(key, entry.python(), GGUFValueType(entry.value_type), sub_type=sub)
    elif isinstance(checkpoint, HFCheckpoint):
        _write_hf_vocabulary(writer, checkpoint)
    if tokenizer.bos_id is not None:
        writer.add_uint32("tokenizer.ggml.bos_token_id", tokenizer.bos_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", tokenizer.bos_id is not None)
    if tokenizer.eos_id is not None:
        writer.add_uint32("tokenizer.ggml.eos_token_id", tokenizer.eos_id)
    eot = tokenizer.token_to_id("<|eot_id|>")
    if eot is not None:
        writer.add_uint32("tokenizer.ggml.eot_token_id", eot)
    if tokenizer.chat_template:
        writer.add_string("tokenizer.chat_template", tokenizer.chat_template)


def _write_hf_vocabulary(writer: GGUFWriter, checkpoint: HFCheckpoint) -> None:
    """tokenizer.json (byte-level BPE) -> the gpt2 vocabulary keys, padded to vocab_size with
    unused tokens as llama.cpp's converter does (its embedding has one row per token)."""
    path = checkpoint.directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FormatError(path, "only byte-level BPE tokenizers can be written to GGUF by ternlm")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), path)
    size = checkpoint.config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, int(TokenType.NORMAL)
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """The tokenizer.ggml.pre name of a tokenizer.json pre-tokenizer (GGUF stores names, not rules)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE[0]
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("pattern", {}).get("Regex") == LLAMA3_PATTERN
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
            return "llama-bpe"
    raise FormatError(path, "the pre-tokenizer is neither GPT-2's nor LLaMA-3's: GGUF cannot name it")


# -- GGUF -> HF --------------------------------------------------------------------------------
def convert_to_hf(source: str | Path, destination: str | Path, progress=None) -> Path:
    """Write a GGUF file as an HF directory: packed uint8 BitLinear weights with a float32
    weight_scale that multiplies (`autobitlinear`), norms in float32, embedding/head as stored
    (float16 when the file holds them quantized)."""
    from safetensors.numpy import save_file

    checkpoint = open_source(Path(source))
    if not isinstance(checkpoint, GGUFCheckpoint):
        raise FormatError(str(source), "--to hf converts GGUF files; this is already an HF directory")
    config = checkpoint.config
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    for name in names:
        dense = checkpoint.dense(name)
        # safetensors' NumPy API has no bfloat16: widen it to float32 (exact)
        tensors[name] = float32_of(dense) if dense.dtype == "bfloat16" else np.ascontiguousarray(dense.array)
    for layer in range(config.num_hidden_layers):
        for norm in layer_norms(config):
            size = config.intermediate_size if norm == "ffn_sub_norm" else config.hidden_size
            tensors[norm_name(layer, norm)] = checkpoint.norm(norm_name(layer, norm), size)
        for projection in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            name = linear_name(layer, projection)
            weights, scale = checkpoint.ternary(name, *linear_shape(config, projection))
            tensors[name] = pack_ternary_hf(weights)
            tensors[name[: -len("weight")] + "weight_scale"] = np.array([scale], dtype=np.float32)
        if progress:
            progress(layer + 1, config.num_hidden_layers)
    save_file(tensors, str(destination / "model.safetensors"))
    raw = config.to_dict()
    raw["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "offline"}
    (destination / "config.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    tok, bos, eos, template = gguf_hf_tokenizer(checkpoint.file)
    tok.save(str(destination / "tokenizer.json"))
    tokenizer_config = {"bos_token": bos, "eos_token": eos}
    if template:
        tokenizer_config["chat_template"] = template
    (destination / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1), encoding="utf-8")
    return destination
