"""Convert a llama-architecture GGUF checkpoint into an HF-format folder.

The folder (config.json, model.safetensors in float32, tokenizer.json, tokenizer_config.json,
generation_config.json) loads offline with ``transformers.AutoModelForCausalLM`` and
``transformers.AutoTokenizer``, and is what the rest of hetpd reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader, GGMLQuantizationType, TokenType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Part of the default model's cache key: bump whenever the produced folder changes.
IMPORTER_VERSION = "hetpd-gguf-import/1"
# Written last into the folder; its presence means the import finished.
IMPORT_MARKER = "hetpd_import.json"

SUPPORTED_ARCHITECTURES = ("llama",)

Progress = Callable[[str], None]
F32Array = npt.NDArray[np.float32]

# GGUF per-layer tensor suffix -> HF per-layer tensor suffix.
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer regexes, as in the original HF tokenizer.json files that llama.cpp fingerprints.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_LLAMA3 = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")
_QWEN2 = ("qwen2", "stablelm2")


class GGUFImportError(ValueError):
    """The GGUF file cannot be converted; the message names the file, key or tensor at fault."""


@dataclass(frozen=True)
class ImportedModel:
    """What :func:`import_gguf` wrote: the finished folder and a summary of the source tensors."""

    out_dir: Path
    architecture: str
    num_tensors: int
    source_types: dict[str, int]  # GGML tensor type name -> number of source tensors of that type


@dataclass(frozen=True)
class _HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_ctx: int


def import_gguf(gguf_path: Path, out_dir: Path, *, progress: Progress | None = None) -> ImportedModel:
    """Convert ``gguf_path`` into an HF-format folder at ``out_dir``.

    Guarantees: ``out_dir`` either does not change (on any error) or appears complete in one
    rename, with :data:`IMPORT_MARKER` inside. Raises FileNotFoundError if ``gguf_path`` is
    missing, FileExistsError if ``out_dir`` exists and is non-empty, GGUFImportError otherwise.
    """
    report: Progress = progress if progress is not None else (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} already exists and is not empty; remove it first")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # GGUFReader raises ValueError/struct errors of many kinds on bad input
        raise GGUFImportError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc

    arch = str(_field(reader, gguf_path, "general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path}: unsupported architecture general.architecture={arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hp = _read_hparams(reader, gguf_path, arch)
    tokenizer, tok_config, special_ids = _build_tokenizer(reader, gguf_path, report)
    tensors, types = _convert_tensors(reader, gguf_path, hp, report)
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[0])
    tied = "lm_head.weight" not in tensors
    if tokenizer.get_vocab_size() > vocab_size:
        # Extra token ids would index past the embedding table at run time.
        raise GGUFImportError(
            f"{gguf_path}: tokenizer has {tokenizer.get_vocab_size()} tokens but token_embd.weight only {vocab_size} rows"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        report(f"writing {len(tensors)} tensors to {out_dir}")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_config["model_max_length"] = hp.n_ctx
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "config.json", _config_json(hp, vocab_size, tied, special_ids))
        _write_json(tmp / "generation_config.json", _generation_config(special_ids))
        summary = ImportedModel(out_dir, arch, len(reader.tensors), dict(sorted(types.items())))
        _write_json(
            tmp / IMPORT_MARKER,
            {"importer": IMPORTER_VERSION, "source": str(gguf_path), "architecture": arch,
             "num_tensors": summary.num_tensors, "source_types": summary.source_types},
        )
        # mkdtemp makes everything owner-only; the cache folder is ordinary shared data.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"imported {gguf_path.name} -> {out_dir}")
    return summary


_MISSING = object()


def _field(reader: GGUFReader, path: Path, key: str, default: Any = _MISSING) -> Any:
    """Value of metadata ``key``; GGUFImportError naming it if absent and no default is given."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise GGUFImportError(f"{path}: required metadata key {key!r} is missing")
        return default
    return field.contents()


def _read_hparams(reader: GGUFReader, path: Path, arch: str) -> _HParams:
    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, path, f"{arch}.{key}", default)

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFImportError(f"{path}: {arch}.attention.value_length differs from key_length; unsupported")
    # HF Llama rotates the whole head; partial rotary (n_rot < head_dim) would silently differ.
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError(f"{path}: {arch}.rope.dimension_count != head_dim {head_dim}; partial rotary unsupported")
    scaling = str(get("rope.scaling.type", "none"))
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        # llama3/yarn scaling parameters are not fully recoverable from GGUF; refuse rather than guess.
        raise GGUFImportError(f"{path}: rope scaling ({scaling!r} / rope_freqs.weight) is not supported")
    return _HParams(
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_ff=int(get("feed_forward_length")),
        n_head=n_head,
        n_head_kv=int(get("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_eps=_f32_decimal(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_decimal(get("rope.freq_base", 10000.0)),
        n_ctx=int(get("context_length")),
    )


def _f32_decimal(value: Any) -> float:
    """Shortest decimal for a float32 GGUF value: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _hf_name(gguf_name: str, n_layer: int) -> str | None:
    """HF tensor name for a GGUF tensor name, or None if the name is not part of a llama model."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layer:
        suffix = _LAYER_NAMES.get(parts[2])
        if suffix is not None:
            return f"model.layers.{int(parts[1])}.{suffix}"
    return None


def unpermute_rotary(w: F32Array, n_head: int) -> F32Array:
    """Invert llama.cpp's q/k row permutation (interleaved rotary pairs -> HF rotate_half halves).

    llama.cpp stores ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``; swapping back the same
    axes on the ``(n_head, d // 2, 2, in)`` view restores the HF row order exactly.
    """
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _convert_tensors(
    reader: GGUFReader, path: Path, hp: _HParams, report: Progress
) -> tuple[dict[str, F32Array], Counter[str]]:
    """Dequantize every tensor to float32 in HF layout; checks that the set is exactly complete."""
    out: dict[str, F32Array] = {}
    types: Counter[str] = Counter()
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors, 1):
        qtype = GGMLQuantizationType(t.tensor_type)
        types[qtype.name] += 1
        name = _hf_name(t.name, hp.n_layer)
        if name is None:
            raise GGUFImportError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        report(f"tensor {i}/{total}: {t.name} ({qtype.name})")
        try:
            values = dequantize(t.data, qtype)
        except NotImplementedError as exc:
            raise GGUFImportError(
                f"{path}: tensor {t.name!r} has GGML type {qtype.name}, which gguf cannot dequantize"
            ) from exc
        # GGUF lists dims innermost-first; numpy/torch want them outermost-first.
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.array(values, dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, hp.n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, hp.n_head_kv)
        out[name] = w
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{s}" for i in range(hp.n_layer) for s in _LAYER_NAMES.values()
    }
    missing = sorted(expected - out.keys())
    if missing:
        raise GGUFImportError(f"{path}: missing tensors (HF names) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out, types


def _pre_tokenizer(pre: str, report: Progress) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """HF pre-tokenizer matching llama.cpp's split rules for ``tokenizer.ggml.pre``, and ignore_merges."""
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    regex = _LLAMA3_REGEX if pre in _LLAMA3 else _QWEN2_REGEX if pre in _QWEN2 else None
    if regex is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), pre in _LLAMA3  # llama.cpp sets ignore_merges only for the llama3 family
    if pre not in _GPT2:
        report(f"warning: unknown tokenizer.ggml.pre={pre!r}; using the GPT-2 byte-level split")
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _build_tokenizer(
    reader: GGUFReader, path: Path, report: Progress
) -> tuple[Tokenizer, dict[str, Any], dict[str, int | None]]:
    """Byte-level BPE tokenizer from the GGUF vocab, its tokenizer_config.json and special ids."""
    kind = str(_field(reader, path, "tokenizer.ggml.model"))
    if kind != "gpt2":
        raise GGUFImportError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' (byte-level BPE) is"
        )
    tokens: list[str] = list(_field(reader, path, "tokenizer.ggml.tokens"))
    types: list[int] = [int(x) for x in _field(reader, path, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))]
    merges: list[tuple[str, str]] = []
    for m in _field(reader, path, "tokenizer.ggml.merges"):
        # Byte-level tokens never contain a literal space, so the first space after
        # position 0 separates the pair (llama.cpp splits the same way).
        cut = m.find(" ", 1)
        if cut < 0:
            raise GGUFImportError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((m[:cut], m[cut + 1:]))
    vocab: dict[str, int] = {}
    for i, piece in enumerate(tokens):
        vocab.setdefault(piece, i)  # first id wins for duplicate strings, as in llama.cpp's lookup
    if len(vocab) != len(tokens):
        report(f"warning: {len(tokens) - len(vocab)} duplicate token strings in the vocab; first id kept")

    ids: dict[str, int | None] = {
        name: (None if (v := _field(reader, path, f"tokenizer.ggml.{key}", None)) is None else int(v))
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("pad", "padding_token_id"), ("unk", "unknown_token_id"))
    }
    for name, tid in ids.items():
        if tid is not None and not 0 <= tid < len(tokens):
            raise GGUFImportError(f"{path}: tokenizer.ggml {name} id {tid} is outside the vocab")
    text = {name: (None if tid is None else tokens[tid]) for name, tid in ids.items()}

    pre = str(_field(reader, path, "tokenizer.ggml.pre", "default"))
    pre_tok, ignore_merges = _pre_tokenizer(pre, report)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=text["unk"], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens are HF special tokens; USER_DEFINED ones are llama.cpp's non-special added
    # tokens: matched whole, but kept when decoding with skip_special_tokens.
    tok.add_tokens([
        AddedToken(tokens[i], special=(t == TokenType.CONTROL), normalized=False)
        for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ])

    add_bos = bool(_field(reader, path, "tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    add_eos = bool(_field(reader, path, "tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    bos = (tokens[ids["bos"]], ids["bos"]) if add_bos and ids["bos"] is not None else None
    eos = (tokens[ids["eos"]], ids["eos"]) if add_eos and ids["eos"] is not None else None
    tok.post_processor = _bos_eos_template(bos, eos) if bos or eos else processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text["bos"],
        "eos_token": text["eos"],
        "pad_token": text["pad"],
        "unk_token": text["unk"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = str(template)
    return tok, config, ids


def _bos_eos_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.PostProcessor:
    """The template transformers builds from add_bos_token/add_eos_token, so the two agree."""

    def seq(name: str, type_id: int) -> str:
        marks = [f"{bos[0]}:{type_id}"] if bos else []
        return " ".join([*marks, f"${name}:{type_id}"] + ([f"{eos[0]}:{type_id}"] if eos else []))

    return processors.TemplateProcessing(
        single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}", special_tokens=[t for t in (bos, eos) if t]
    )


def _config_json(hp: _HParams, vocab_size: int, tied: bool, ids: dict[str, int | None]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.n_embd,
        "intermediate_size": hp.n_ff,
        "num_hidden_layers": hp.n_layer,
        "num_attention_heads": hp.n_head,
        "num_key_value_heads": hp.n_head_kv,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hp.rms_eps,
        # transformers 5 reads rope_parameters; rope_theta is kept for readers of the legacy key.
        "rope_theta": hp.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "max_position_embeddings": hp.n_ctx,
        "vocab_size": vocab_size,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        # transformers 5 names it dtype; torch_dtype is the transformers 4 spelling.
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def _generation_config(ids: dict[str, int | None]) -> dict[str, Any]:
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
