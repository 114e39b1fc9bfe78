"""Model config parsing: v4 and v5 RoPE keys, and errors that name what is unsupported or missing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.models.config import ModelConfig, UnsupportedModelError
from hetpd.models.loader import MissingWeightError

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2}


def test_v4_and_v5_rope_keys_read_the_same() -> None:
    v4 = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    assert v4.rope == v5.rope and v4.rope.theta == 5e5 and v4.rope.rope_type == "llama3"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPTNeoXForCausalLM"]}, "GPTNeoXForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_configs_are_named(change: dict[str, object], message: str) -> None:
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_dict(raw)


def test_missing_files_are_named(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine.from_config(EngineConfig(model=str(tmp_path)))
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), copy)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Engine.from_config(EngineConfig(model=str(copy)))


def test_missing_tensor_is_named(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), copy)
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(MissingWeightError, match="model.layers.1.mlp.up_proj.weight"):
        Engine.from_config(EngineConfig(model=str(copy)))


def test_engine_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="role"):
        EngineConfig(role="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int3")
    json.dumps(EngineConfig().__dict__)  # configs are plain data
