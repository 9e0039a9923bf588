"""Safetensors checkpoints as Hugging Face lays them out: read by slices, write in shards.

A directory holds `model.safetensors`, or shards named by `model.safetensors.index.json`.
Files are opened memory-mapped through `safetensors` (numpy; no torch), and `read` copies
only the requested rows and columns, so an importer never holds a whole file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxlm.interop.hf_config import InteropError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsDir:
    """The tensors of one checkpoint directory, by name."""

    def __init__(self, path: str | Path):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs for BF16)
        from safetensors import safe_open

        path = Path(path)
        if (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise InteropError(f"{path / INDEX} is not a safetensors index (no weight_map)") from None
        elif (path / SINGLE).is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            raise InteropError(f"{path} holds neither {SINGLE} nor {INDEX}" + (
                f" (found {', '.join(found[:3])}; only safetensors checkpoints are read)" if found else ""))
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        for name in files:
            if not (path / name).is_file():
                raise InteropError(f"{path / INDEX} names {name}, which is missing")
        self._files = {name: safe_open(str(path / name), framework="numpy") for name in files}
        self._where = {}
        for file, handle in self._files.items():
            for key in handle.keys():
                self._where[key] = file
        if weight_map:
            for key, file in weight_map.items():
                if self._where.get(key) != file:
                    raise InteropError(f"{path / INDEX} puts {key} in {file}, which does not hold it")

    def names(self) -> set[str]:
        return set(self._where)

    def _slice(self, name: str):
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. "BF16"."""
        return self._slice(name).get_dtype()

    def read(self, name: str, ranges: tuple[slice, ...]) -> np.ndarray:
        """The block `tensor[ranges]` (one slice per dimension), copied out of the file."""
        return np.asarray(self._slice(name)[ranges])


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, grouped into files of at most `max_shard_bytes` (one tensor may exceed)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, nbytes in sizes:
        if shards[-1] and total + nbytes > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += nbytes
    return shards


def write_dir(path: str | Path, tensors: list[tuple[str, int, Callable[[], np.ndarray]]],
              max_shard_bytes: int) -> list[str]:
    """Write (name, nbytes, make_array) tensors as model.safetensors, or as shards plus an index.

    Arrays are made one file at a time, so memory holds at most one shard. Returns the file names.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    makers = {name: make for name, _, make in tensors}
    shards = shard_plan([(name, nbytes) for name, nbytes, _ in tensors], max_shard_bytes)
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for file, names in zip(files, shards):
        arrays = {name: np.ascontiguousarray(makers[name]()) for name in names}
        save_file(arrays, str(path / file), metadata={"format": "pt"})
        del arrays
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes, _ in tensors)},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files
