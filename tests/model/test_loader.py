"""Checkpoint loading: file layouts, legacy config names and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, JetMoeModelConfig
from model.layers.attention import allocate_kv_cache
from model.loader import CheckpointError, load_model, resolve_dtype
from server.engine.worker.batch import build_flat_batch
from tests.support.checkpoints import TOP2_OF_8, save_checkpoint

IDS = [5, 17, 99, 3, 42, 7, 250, 11]


def logits_of(model) -> torch.Tensor:
    c = model.config
    cache = allocate_kv_cache(
        c.num_layers, 4, 4, c.num_kv_heads, c.head_dim, model.output_weight().dtype, "cpu"
    )
    positions, meta = build_flat_batch(model.attention_backend, [len(IDS)], [len(IDS)], [[2, 0]], 4, all_logits=True)
    return model(torch.tensor(IDS), positions, cache, meta).float()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("single")
    hf = save_checkpoint(TOP2_OF_8, directory)
    with torch.no_grad():
        expected = hf(torch.tensor([IDS])).logits[0]
    return directory, expected


def test_single_file_safetensors(reference) -> None:
    directory, expected = reference
    assert (directory / "model.safetensors").is_file()
    assert (logits_of(load_model(directory)) - expected).abs().max().item() <= 1e-4


def test_sharded_safetensors(tmp_path: Path, reference) -> None:
    _, expected = reference
    hf = save_checkpoint(TOP2_OF_8, tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    del hf
    assert (logits_of(load_model(tmp_path)) - expected).abs().max().item() <= 1e-4


def test_pytorch_bin_fallback(tmp_path: Path, reference) -> None:
    directory, expected = reference
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(load_file(directory / "model.safetensors"), tmp_path / "pytorch_model.bin")
    assert (logits_of(load_model(tmp_path)) - expected).abs().max().item() <= 1e-4


def test_legacy_config_names_give_the_same_model(tmp_path: Path, reference) -> None:
    directory, expected = reference
    raw = json.loads((directory / "config.json").read_text())
    legacy = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_key_value_heads": "n_head",
        "intermediate_size": "ffn_hidden_size",
        "num_local_experts": "moe_num_experts",
        "num_experts_per_tok": "moe_top_k",
    }
    for new, old in legacy.items():
        raw[old] = raw.pop(new)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    config = JetMoeModelConfig.from_dir(tmp_path)
    assert (config.num_layers, config.num_kv_heads, config.top_k) == (2, 4, 2)
    assert (logits_of(load_model(tmp_path)) - expected).abs().max().item() <= 1e-4


def copy_with_tensors(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "model.safetensors")


def test_missing_tensor_is_named(tmp_path: Path, reference) -> None:
    directory, _ = reference
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.output_linear.weight"]
    copy_with_tensors(directory, tmp_path, tensors)
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.output_linear\.weight"
    ):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path: Path, reference) -> None:
    directory, _ = reference
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    copy_with_tensors(directory, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.extra\.weight"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path: Path, reference) -> None:
    directory, _ = reference
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attention.kv_proj.weight"] = torch.zeros(8, 64)
    copy_with_tensors(directory, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"kv_proj\.weight.*shape \(8, 64\), expected \(128, 64\)"):
        load_model(tmp_path)


def test_missing_weights_and_missing_dir(tmp_path: Path, reference) -> None:
    directory, _ = reference
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_bfloat16_load_is_close(reference) -> None:
    directory, expected = reference
    model = load_model(directory, dtype="bfloat16")
    assert model.output_weight().dtype == torch.bfloat16
    assert (logits_of(model) - expected).abs().max().item() < 0.1
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_config_errors(tmp_path: Path) -> None:
    base = {
        "model_type": "jetmoe",
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "kv_channels": 4,
        "intermediate_size": 8,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
    }
    assert JetMoeModelConfig.from_dict(base).rms_norm_eps == 1e-6
    without = dict(base)
    del without["num_experts_per_tok"]
    with pytest.raises(ConfigError, match="top_k.*num_experts_per_tok, moe_top_k"):
        JetMoeModelConfig.from_dict(without)
    with pytest.raises(ConfigError, match="exceeds"):
        JetMoeModelConfig.from_dict({**base, "num_experts_per_tok": 3})
    (tmp_path / "config.json").write_text(json.dumps({**base, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="not 'jetmoe'"):
        JetMoeModelConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        JetMoeModelConfig.from_dir(tmp_path / "absent")
    rope = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    assert JetMoeModelConfig.from_dict(rope).rope_theta == 500.0
