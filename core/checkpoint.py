"""Checkpoint directories: config files and safetensors tensors, read lazily one tensor at a time.

The safetensors header is parsed and checked here (size, dtype, offsets in bounds) so that a
corrupt file yields a CheckpointError naming the file and tensor, and so that BF16 can be read
without a framework. Tensor bytes are read with one readinto() each: host memory holds at most
the tensor being converted, never the checkpoint twice.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import attrs
import numpy as np

from .config import read_json
from .errors import CheckpointError, UnsupportedDtypeError

# safetensors dtype → (numpy dtype of the stored bits, bytes per element). BF16 is kept as uint16 bits.
DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
MAX_HEADER = 100 << 20  # same bound as the safetensors library


@attrs.frozen
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, stored dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors header; raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{path}: safetensors header length {n} is absurd for a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    base, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(path, name, meta, base, data_len)
    return out


def _tensor_info(path: Path, name: str, meta, base: int, data_len: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
    if dtype not in DTYPES:
        raise UnsupportedDtypeError(f"{path}: tensor {name!r} has dtype {dtype!r}; archkit reads only {sorted(DTYPES)}")
    begin, end = offs
    numel = int(np.prod(shape, dtype=object))
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}] fall outside the data ({data_len} bytes)")
    if end - begin != numel * DTYPES[dtype][1]:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {numel * DTYPES[dtype][1]}")
    return TensorInfo(name, path, dtype, tuple(shape), base + begin, end - begin)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The stored bits of one tensor as a fresh numpy array (BF16 as uint16)."""
    np_dtype, _ = DTYPES[info.dtype]
    arr = np.empty(info.numel, dtype=np_dtype)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(arr).cast("B"))
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror or e})") from None
    if got != info.nbytes:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} is truncated ({got} of {info.nbytes} bytes)")
    return arr.reshape(info.shape)


def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits → float32 (exact for F16 and BF16)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.astype(np.float32, copy=False)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


class Checkpoint:
    """A checkpoint directory: parsed config files and an index of every tensor (no data read)."""

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
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
                tensors[name] = info
        if expected is not None:
            for name, shard in expected.items():
                info = tensors.get(name)
                if info is None or info.file.name != Path(shard).name:
                    raise CheckpointError(f"{index}: weight_map puts {name!r} in {shard!r}, but that shard does not hold it")
        return files, tensors

    def _from_index(self, index: Path) -> tuple[list[Path], dict[str, str]]:
        data = read_json(index, "model.safetensors.index.json")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        root = self.path.resolve()
        files = []
        for shard in dict.fromkeys(wm.values()):
            p = Path(shard)
            resolved = (self.path / p).resolve()
            if p.is_absolute() or ".." in p.parts or resolved.parent != root:
                raise CheckpointError(f"{index}: shard path {shard!r} escapes the checkpoint directory")
            if not resolved.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} is missing")
            files.append(self.path / p)
        return files, wm

    def read(self, name: str) -> np.ndarray:
        """Stored bits of tensor `name` (see read_tensor)."""
        return read_tensor(self.tensors[name])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __repr__(self):
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors in {len(self.files)} file(s))"
