"""Safetensors loader: one file or sharded (model.safetensors.index.json), memory-mapped; each
rank reads only the tensors and slices its modules own (ParamSpec)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from afd.config import ConfigError
from afd.models.step3 import ParamSpec
from afd.quantization import BlockScales

INDEX_FILE = "model.safetensors.index.json"
SKIPPED_PREFIXES = ("vision_model.", "vit_downsampler", "vit_large_projector")


class CheckpointError(ConfigError):
    """The checkpoint lacks a tensor, has a wrong shape, or its files are inconsistent: a
    config error like any other bad user input (one line naming the file, no traceback)."""


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
        with open_shard(shard) as f:
            files.update({k: shard for k in f.keys() if not k.startswith(SKIPPED_PREFIXES)})
    return files


def load_params(
    module: nn.Module,
    specs: dict[str, ParamSpec],
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    fp8_block: tuple[int, int] | None = None,
    keep_fp8: Collection[str] = (),
) -> dict[str, BlockScales]:
    """Fills every parameter of `module` named in `specs` from the checkpoint at `path`.

    A tensor stored in e4m3 (a block-FP8 checkpoint, `fp8_block` from its config) is read with
    its scale tensor (SCALE_SUFFIXES, beside the weight's key) and dequantized to `dtype`,
    except for the parameters named in `keep_fp8`: those keep the e4m3 values, and their
    scales are returned by parameter name."""
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
    kept: dict[str, BlockScales] = {}
    with ExitStack() as stack:
        opened: dict[Path, Any] = {}

        def open_file(file: Path) -> Any:
            if file not in opened:
                opened[file] = stack.enter_context(open_shard(file))
            return opened[file]

        reader = _Fp8Reader(files, open_file, path, fp8_block)

        for file, names in by_file.items():
            for name in names:
                spec, param = specs[name], params[name]
                view = _checked_view(open_file(file), file, spec)
                if view.get_dtype() in FLOAT_DTYPES:
                    tensor = view[spec.index] if spec.index else view[:]
                    param.data = tensor.to(device=device, dtype=dtype).contiguous()
                    continue
                if view.get_dtype() != FP8_DTYPE:  # cast as numbers, it would load wrong
                    raise CheckpointError(
                        f"{file.name}: tensor '{spec.key}' is stored as {view.get_dtype()}; "
                        f"afd reads 16/32-bit floats and block-FP8 e4m3 ({FP8_DTYPE}) weights"
                    )
                values, scales, crop = reader.read(spec, view, file, device)
                if name in keep_fp8:  # owned whole blocks (experts are split by expert)
                    if values.shape != param.shape:
                        raise CheckpointError(
                            f"{file.name}: '{spec.key}': the e4m3 slice this rank owns is not "
                            f"whole blocks of {list(scales.block)}"
                        )
                    param.data, kept[name] = values, scales
                else:  # slicing the mmapped view reads only the owned blocks from disk
                    param.data = scales.dequantize(values, dtype)[crop].contiguous()
    return kept


FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# where a block-FP8 checkpoint keeps a weight's scales: `<prefix>.weight_scale_inv` (Hugging
# Face / DeepSeek-V3, multiplied in despite the name) or `<prefix>.weight_scale`
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")


def open_shard(file: Path) -> Any:
    """safe_open, with a file it cannot read (a bad header, a truncated copy, no permission)
    reported by name, as every other checkpoint error is."""
    try:
        return safe_open(str(file), "pt", device="cpu")
    except Exception as e:  # safetensors' SafetensorError, or an OSError
        raise CheckpointError(f"{file}: cannot read it as safetensors: {e}") from e


def _slice(f: Any, file: Path, key: str) -> Any:
    try:
        return f.get_slice(key)
    except Exception as e:  # SafetensorError: the index maps a key to a shard without it
        raise CheckpointError(
            f"{file}: has no tensor '{key}', though {INDEX_FILE} maps it to this file"
        ) from e


def _checked_view(f: Any, file: Path, spec: ParamSpec) -> Any:
    view = _slice(f, file, spec.key)
    found = tuple(view.get_shape())
    if found != spec.full_shape:
        raise CheckpointError(
            f"{file.name}: tensor '{spec.key}' has shape {list(found)}, "
            f"expected {list(spec.full_shape)}"
        )
    return view


@dataclass
class _Fp8Reader:
    """Reads an e4m3 tensor's owned slice widened to whole scale blocks, with its scales."""

    files: dict[str, Path]
    open_file: Callable[[Path], Any]
    path: Path
    block: tuple[int, int] | None

    def read(
        self, spec: ParamSpec, view: Any, file: Path, device: torch.device | str
    ) -> tuple[torch.Tensor, BlockScales, tuple[slice, ...]]:
        """(e4m3 values of the widened slice, their scales, the crop back to spec.index)."""
        if self.block is None:
            raise CheckpointError(
                f"{file.name}: tensor '{spec.key}' is float8_e4m3fn but "
                f"{self.path / 'config.json'} has no quantization_config.weight_block_size"
            )
        base = spec.key.removesuffix("weight")
        scale_key = next((base + s for s in SCALE_SUFFIXES if base + s in self.files), None)
        if scale_key is None:
            raise CheckpointError(
                f"{file.name}: tensor '{spec.key}' is float8_e4m3fn but its scale tensor "
                f"('{base}{SCALE_SUFFIXES[0]}') is not in the checkpoint"
            )
        scale_file = self.files[scale_key]
        scale_view = _slice(self.open_file(scale_file), scale_file, scale_key)
        want = BlockScales.shape_for(spec.full_shape, self.block)
        if tuple(scale_view.get_shape()) != want:
            raise CheckpointError(
                f"{scale_file.name}: scale tensor '{scale_key}' has shape "
                f"{list(scale_view.get_shape())}, expected {list(want)} (blocks of "
                f"{list(self.block)} over {list(spec.full_shape)})"
            )
        read, scale_index, crop = _block_aligned(spec, self.block)
        values = view[read].to(device)
        scale = scale_view[scale_index].to(device=device, dtype=torch.float32)
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{scale_file.name}: scale tensor '{scale_key}' is not finite")
        return values, BlockScales(scale, self.block), crop


def _block_aligned(
    spec: ParamSpec, block: tuple[int, int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]:
    """spec.index widened to whole blocks on the last two dimensions: the slice to read, the
    scales' slice, and the crop from the widened read back to spec.index."""
    shape, ndim = spec.full_shape, len(spec.full_shape)
    index = list(spec.index) + [slice(None)] * (ndim - len(spec.index))
    read, scales, crop = [], [], []
    for dim, (sl, size) in enumerate(zip(index, shape, strict=True)):
        lo, hi, step = sl.indices(size)
        assert step == 1, "owned slices are contiguous"
        if dim < ndim - 2:
            read.append(slice(lo, hi))
            scales.append(slice(lo, hi))
            crop.append(slice(None))
            continue
        b = block[dim - (ndim - 2)]
        first, end = lo // b, -(-hi // b)
        read.append(slice(first * b, min(end * b, size)))
        scales.append(slice(first, end))
        crop.append(slice(lo - first * b, hi - first * b))
    return tuple(read), tuple(scales), tuple(crop)


def build_on_device(module_fn, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Constructs a module without allocating random weights (meta device), ready for loading."""
    with torch.device("meta"):
        module = module_fn()
    return module.to(dtype=dtype).to_empty(device=device)
