"""Load a local Hugging Face JetMoe checkpoint directory into ``JetMoeForCausalLM``.

Weights come from ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``) or, as a
fallback, ``pytorch_model*.bin``. The model is built on the meta device and materialised with ``to_empty``, so
no throw-away random initialisation happens and peak memory stays near the size of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.config import JetMoeModelConfig
from model.jetmoe import JetMoeForCausalLM
from model.kernels.registry import KernelChoice, Kernels, select_kernels

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROGRESS_MIN_BYTES = 1 << 30


class CheckpointError(ValueError):
    """The checkpoint's weights do not match the JetMoe architecture its config describes."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" picks bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {
        "fp32": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "float": "float32",
    }
    name = aliases.get(dtype, dtype)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA when available."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    kernels: Kernels | KernelChoice | None = None,
    show_progress: bool | None = None,
) -> JetMoeForCausalLM:
    """Build ``JetMoeForCausalLM`` from a checkpoint directory, weights cast to ``dtype`` on ``device``.

    ``kernels``: a bundle, or a choice resolved here for the device, dtype and shape (default: all ``"auto"``).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    config = JetMoeModelConfig.from_dir(path)
    target = resolve_device(device)
    weight_dtype = resolve_dtype(dtype, target)
    if not isinstance(kernels, Kernels):
        kernels = select_kernels(target, kernels, weight_dtype, config)
    with torch.device("meta"):
        model = JetMoeForCausalLM(config, kernels)
    model = model.to(weight_dtype).to_empty(device=target)
    params = dict(model.named_parameters())
    _check_names(params, _checkpoint_names(path), config.tie_word_embeddings)
    total = sum(p.numel() * p.element_size() for p in params.values())
    show = total >= _PROGRESS_MIN_BYTES if show_progress is None else show_progress
    with torch.no_grad():
        for name, tensor in tqdm(
            _iter_tensors(path), total=len(params), desc="loading weights", disable=not show
        ):
            if name not in params:  # a stored copy of the tied lm_head
                continue
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return model.eval()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(f"no model.safetensors, sharded safetensors or pytorch_model*.bin in {path}")


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _weight_files(path):
        if not file.is_file():
            raise CheckpointError(f"weight file {file.name} listed by the index is missing from {path}")
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, handle.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def _checkpoint_names(path: Path) -> set[str]:
    names: set[str] = set()
    with ExitStack() as stack:
        for file in _weight_files(path):
            if file.suffix == ".safetensors" and file.is_file():
                names.update(stack.enter_context(safe_open(str(file), framework="pt", device="cpu")).keys())
            elif file.is_file():
                names.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())
    return names


def _check_names(params: dict[str, torch.nn.Parameter], stored: set[str], tied: bool) -> None:
    expected = set(params)
    missing = sorted(expected - stored)
    unexpected = sorted(stored - expected - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
        )
