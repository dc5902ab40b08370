"""Safetensors loader: one file or sharded (model.safetensors.index.json), memory-mapped; each
rank reads only the tensors and slices its modules own (ParamSpec)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from afd.models.step3 import ParamSpec

INDEX_FILE = "model.safetensors.index.json"
SKIPPED_PREFIXES = ("vision_model.", "vit_downsampler", "vit_large_projector")


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor, has a wrong shape, or its files are inconsistent."""


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Maps every text-model tensor key to the file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e!r})") from e
        files = {k: path / f for k, f in weight_map.items() if not k.startswith(SKIPPED_PREFIXES)}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            files.update({k: shard for k in f.keys() if not k.startswith(SKIPPED_PREFIXES)})
    return files


def load_params(
    module: nn.Module,
    specs: dict[str, ParamSpec],
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Fills every parameter of `module` named in `specs` from the checkpoint at `path`."""
    path = Path(path)
    files = checkpoint_files(path)
    params = dict(module.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, spec in specs.items():
        if spec.key not in files:
            raise CheckpointError(
                f"{path}: missing tensor '{spec.key}' (expected shape {list(spec.full_shape)})"
            )
        by_file.setdefault(files[spec.key], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                _copy_one(f, file, specs[name], params[name], dtype, device)


def _copy_one(
    f,
    file: Path,
    spec: ParamSpec,
    param: nn.Parameter,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    view = f.get_slice(spec.key)
    found = tuple(view.get_shape())
    if found != spec.full_shape:
        raise CheckpointError(
            f"{file.name}: tensor '{spec.key}' has shape {list(found)}, "
            f"expected {list(spec.full_shape)}"
        )
    # slicing the mmapped view reads only the owned rows/columns from disk
    tensor = view[spec.index] if spec.index else view[:]
    param.data = tensor.to(device=device, dtype=dtype).contiguous()


def build_on_device(module_fn, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Constructs a module without allocating random weights (meta device), ready for loading."""
    with torch.device("meta"):
        module = module_fn()
    return module.to(dtype=dtype).to_empty(device=device)
