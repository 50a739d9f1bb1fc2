"""Read named tensors from a safetensors checkpoint directory, opening only the files that hold them.

Sharded checkpoints name each tensor's file in ``model.safetensors.index.json``; a single-file
checkpoint is one ``model.safetensors``. Every tensor read is recorded, so a caller (and a test)
can tell exactly what a partial load touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint:
    """The tensors of one checkpoint directory, by key."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE_FILE).exists():
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.keys_read: set[str] = set()
        self.files_opened: set[str] = set()

    @staticmethod
    def present(directory: str | Path) -> bool:
        directory = Path(directory)
        return (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists()

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` on the CPU, file by file, opening only the files needed."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.file_of:
                raise KeyError(f"{self.directory} has no tensor {key!r}")
            by_file.setdefault(self.file_of[key], []).append(key)
        for filename in sorted(by_file):
            self.files_opened.add(filename)
            for key in by_file[filename]:
                # One opening per tensor: a tensor is a view of the file's memory map, so the pages
                # it touched stay resident while the file is open. Reopening (which reads only the
                # header) lets a tensor that is cast or moved off the CPU take its pages with it,
                # instead of the whole part's staying mapped beside the copies.
                with safe_open(str(self.directory / filename), framework="pt") as handle:
                    tensor = handle.get_tensor(key)
                self.keys_read.add(key)
                yield key, tensor
