"""Checkpoint directories: config files, the safetensors files' index, tokenizer, quantization — read lazily.

The safetensors layer (headers checked, one tensor read at a time: host memory holds at most the tensor being
converted, never the checkpoint twice) is core/safetensors_io.py; its names stay importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import read_json
from .errors import CheckpointError
from .quant import view
# the safetensors layer's names stay importable from here (weights, backends, tp_load and tests use them)
from .safetensors_io import (DTYPES, MAX_DIM, MAX_HEADER, MAX_NAME, MAX_NDIM, MAX_TENSORS,  # noqa: F401
                             PLAIN_DTYPES, TensorInfo, _short, float32_to_bf16_bits, read_safetensors_header,
                             read_tensor, read_tensor_slice, regular_file, to_float32)
from .tokenizer import Tokenizer


class Checkpoint:
    """A checkpoint directory: parsed config files, its tokenizer (or None) and an index of every tensor (no data
    read). Side files are read only up to core.config.SIDE_FILE_LIMITS; weights must be files inside the directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (a checkpoint is a directory with config.json and *.safetensors)")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{self.path}: directory is not readable")
        cfg = self.path / "config.json"
        self.config: dict | None = read_json(cfg, "config.json") if cfg.exists() else None
        gen = self.path / "generation_config.json"
        self.generation_config: dict = read_json(gen, "generation_config.json") if gen.exists() else {}
        self.files, self.tensors = self._index()
        # Quantized modules (GPTQ, AWQ, FP8, compressed-tensors) become one tensor each under the plain weight's name.
        self.tensors, self.quantization = view(self.path, self.config, self.tensors)
        # parsed here, so that `archkit inspect` fails on a tokenizer that `generate` would fail on
        self.tokenizer: Tokenizer | None = Tokenizer.from_dir(self.path)

    def _index(self) -> tuple[list[Path], dict[str, TensorInfo]]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            files, expected = self._from_index(index)
        elif single.exists():
            files, expected = [single], None
        else:
            files, expected = sorted(self.path.glob("*.safetensors")), None
            if not files:
                raise CheckpointError(f"{self.path}: no weights (expected model.safetensors or model.safetensors.index.json)")
        if expected is None:
            for f in files:
                self._inside(f, f, "weights file")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_safetensors_header(f, MAX_TENSORS - len(tensors)).items():
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor {_short(name)} also appears in {_short(tensors[name].file.name)}")
                tensors[name] = info
        if expected is not None:
            for name, shard in expected.items():
                info = tensors.get(name)
                if info is None or info.file.name != Path(shard).name:
                    raise CheckpointError(f"{index}: weight_map puts {_short(name)} in {_short(shard)}, but that shard "
                                          f"does not hold it")
        return files, tensors

    def _from_index(self, index: Path) -> tuple[list[Path], dict[str, str]]:
        data = read_json(index, "model.safetensors.index.json", CheckpointError)
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        if len(wm) > MAX_TENSORS:
            raise CheckpointError(f"{index}: 'weight_map' lists {len(wm)} tensors; archkit refuses more than "
                                  f"{MAX_TENSORS} (real checkpoints hold under 100,000)")
        files = []
        for shard in dict.fromkeys(wm.values()):
            p = Path(shard)
            try:
                present = (self.path / p).resolve().is_file()
            except (OSError, ValueError, RuntimeError) as e:  # a name too long, with a NUL byte, or a symlink loop
                raise CheckpointError(f"{index}: shard name {_short(shard)} is not a usable file name ({e})") from None
            if p.is_absolute() or ".." in p.parts:
                raise CheckpointError(f"{index}: shard path {_short(shard)} escapes the checkpoint directory "
                                      f"(shards are file names inside it)")
            self._inside(self.path / p, index, f"shard path {_short(shard)}")
            if not present:
                raise CheckpointError(f"{index}: shard {_short(shard)} is missing")
            files.append(self.path / p)
        return files, wm

    def _inside(self, f: Path, source: Path, what: str) -> None:
        """CheckpointError (reported against `source`, about `what`) unless weights file `f` lies directly inside
        the checkpoint directory once symlinks are resolved: a downloaded checkpoint must not make archkit read,
        and then serve as weights, a file elsewhere on the machine. The one exception is the Hugging Face cache,
        whose snapshot files (.../snapshots/<rev>/x) are symlinks into the same repository's .../blobs/."""
        try:
            resolved, root = f.resolve(), self.path.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise CheckpointError(f"{source}: {what} cannot be resolved ({e})") from None
        allowed = (root, root.parent.parent / "blobs") if root.parent.name == "snapshots" else (root,)
        if resolved.parent not in allowed:
            raise CheckpointError(f"{source}: {what} escapes the checkpoint directory: it resolves to "
                                  f"{_short(str(resolved))} (weights must be files inside it)")

    def read(self, name: str) -> np.ndarray:
        """Stored bits of tensor `name` (see read_tensor)."""
        return read_tensor(self.tensors[name])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __repr__(self):
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors in {len(self.files)} file(s))"
