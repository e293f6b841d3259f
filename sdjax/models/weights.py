"""Reading diffusers/transformers-format weight directories.

A component directory holds `config.json` and either one `*.safetensors` file or several shards listed in
a `*.safetensors.index.json`. Tensors are read lazily, one at a time, straight from the memory-mapped file,
so loading never holds a second full host copy of the checkpoint.

Every problem is reported as a `WeightsError` naming the file and the key: a missing file, a truncated or
corrupted safetensors file, a missing / unexpected / mis-shaped tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open


class WeightsError(ValueError):
    """A checkpoint directory or file that cannot be loaded as asked."""


def read_config(directory: str | os.PathLike) -> dict:
    """`config.json` of a component directory, or a clear error."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: missing (a diffusers/transformers component directory needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise WeightsError(f"{indexes[0]}: has no weight_map")
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{f}: listed in {indexes[0].name} but missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors weights found")
    return files


def _check_size(path: Path) -> None:
    """safetensors validates offsets lazily; check the header against the file size up front."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise WeightsError(f"{path}: corrupted or truncated safetensors header")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupted safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated ({size} bytes, header describes {8 + n + end})")


class SafetensorsDir(Mapping[str, np.ndarray]):
    """Read-only mapping from tensor name to a numpy array, read on access from memory-mapped files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise WeightsError(f"{self.directory}: not a directory")
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in _weight_files(self.directory):
            _check_size(f)
            try:
                handle = safe_open(str(f), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{f}: cannot be read as safetensors ({e})") from None
            self._handles[f] = handle
            for key in handle.keys():
                if key in self._where:
                    raise WeightsError(f"{f}: tensor {key!r} also appears in {self._where[key]}")
                self._where[key] = f

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise WeightsError(f"{self.directory}: tensor {key!r} is missing")
        f = self._where[key]
        try:
            return self._handles[f].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{f}: tensor {key!r} cannot be read ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def check_keys(available: set[str], expected: set[str], where: str) -> None:
    """Strict loading: the checkpoint has exactly the tensors the model needs."""
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:5]}")
        raise WeightsError(f"{where}: " + "; ".join(parts))


def fetch(tensors: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], where: str,
          transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """One tensor, transformed to the model's layout, with its shape checked."""
    arr = tensors[key]
    if transform is not None:
        arr = transform(arr)
    if tuple(arr.shape) != tuple(shape):
        raise WeightsError(f"{where}: tensor {key!r} has shape {tuple(arr.shape)}, model expects {tuple(shape)}")
    return arr
