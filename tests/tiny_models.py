"""Tiny randomly initialised HF checkpoints of each supported architecture, made by the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

VOCAB_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)

BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama_tied": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mistral": dict(sliding_window=24),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),
}


def make_tiny_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write an HF folder (config, safetensors, tokenizer) for ``kind`` and return it."""
    from transformers import (  # noqa: PLC0415 - heavy import only where needed
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "llama_tied": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **ARCH_OVERRIDES[kind]})
    model = model_cls(config)
    # Random init is small; scale weights up so attention patterns and logits are far from uniform.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif "bias" in name:
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    write_tiny_tokenizer(out_dir)
    return out_dir


def write_tiny_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }))


def byte_level(longest: int = 64, normalizer: Any = None) -> HFTokenizer:
    """A byte-level BPE (as SmolLM2's, Llama 3's) whose longest token is ``longest`` a's."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges, piece = [], "a"
    while len(piece) < longest:
        merges.append((piece, piece))
        piece *= 2
        vocab[piece] = len(vocab)
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer
