"""safetensors files: headers parsed and checked, tensors read lazily one at a time, dtype conversions.

(core/checkpoint.py builds a checkpoint directory's index on this; core/quant reads quantized parts with it.)

The safetensors header is parsed and checked here (size, dtype, offsets in bounds) so that a
corrupt file yields a CheckpointError naming the file and tensor, and so that BF16 can be read
without a framework. Tensor bytes are read with one readinto() each: host memory holds at most
the tensor being converted, never the checkpoint twice.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import struct
from pathlib import Path

import attrs
import numpy as np

from .errors import CheckpointError, UnsupportedDtypeError, brief

# safetensors dtype → (numpy dtype of the stored bits, bytes per element). BF16 is kept as uint16 bits.
DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
PLAIN_DTYPES = tuple(DTYPES)  # what a weight may be stored as outside a quantized module
# The parts of quantized weights (core/quant): FP8 codes kept as bytes, packed and index integers. A tensor in one
# of these that no quantized module explains is refused when the checkpoint is indexed (core.quant.view).
DTYPES.update({"F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1), "I8": (np.int8, 1), "U8": (np.uint8, 1),
               "I32": (np.int32, 4), "I64": (np.int64, 8)})
MAX_HEADER = 100 << 20  # same bound as the safetensors library
MAX_DIM = (1 << 63) - 1  # a dimension must fit numpy's int64 shapes
MAX_NDIM = 64  # numpy's limit
# Tensors in one checkpoint, all files together. The largest real ones hold ~90,000 (DeepSeek-V3: 256 experts x 58
# layers x 3); a forged header of a million empty tensors costs tens of seconds to index, so it is refused as the
# header is parsed, before most of that work.
MAX_TENSORS = 1 << 17
MAX_NAME = 512  # characters in a tensor name; real ones are under 200, and names end up in error messages


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
        return math.prod(self.shape)  # exact: int64 would wrap for a forged [2**62, 4, 0]


def read_safetensors_header(path: Path, max_tensors: int = MAX_TENSORS) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors header; raises CheckpointError naming the file.

    The rules are the safetensors library's: header length within the file and MAX_HEADER, a JSON object,
    known dtypes, byte spans matching dtype x shape, and spans that tile the data exactly (no gaps, no
    overlaps: two tensors cannot alias the same bytes). Ours on top: at most max_tensors tensors, names of at
    most MAX_NAME characters.
    """
    try:
        size = regular_file(path).st_size
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_counting(path, max_tensors))
    except _TooMany as e:
        raise CheckpointError(str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    base, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if len(name) > MAX_NAME:
            raise CheckpointError(f"{path}: tensor name {_short(name, 60)} has {len(name)} characters; "
                                  f"at most {MAX_NAME} are allowed")
        out[name] = _tensor_info(path, name, meta, base, data_len)
    _check_tiling(path, out.values(), base, data_len)
    return out


class _TooMany(Exception):
    """Raised from inside json.loads (a CheckpointError would be taken for a JSON syntax error)."""


def _counting(path: Path, max_tensors: int):
    """A json object_pairs_hook that stops the parse once the header has built more objects than max_tensors
    allows (one per tensor, one for __metadata__, one for the header itself): memory and time stay bounded."""
    count = 0

    def hook(pairs):
        nonlocal count
        count += 1
        if count > max_tensors + 2:
            raise _TooMany(f"{path}: safetensors header holds more than {max_tensors} tensors, which would pass the "
                           f"{MAX_TENSORS} archkit accepts in one checkpoint (real ones hold under 100,000)")
        return dict(pairs)

    return hook


def regular_file(path: Path) -> os.stat_result:
    """stat() of `path`, which must be a regular file (a FIFO would block the read; a directory cannot be read)."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    return st


def _check_tiling(path: Path, infos, base: int, data_len: int) -> None:
    end, prev = 0, None
    for t in sorted(infos, key=lambda t: (t.offset, t.nbytes)):
        start = t.offset - base
        if start != end:
            where = f"overlaps {_short(prev)}" if start < end else \
                f"leaves {start - end} bytes unclaimed after {_short(prev)}" if prev else f"leaves the first {start} bytes unclaimed"
            raise CheckpointError(f"{path}: tensor {_short(t.name)} at data bytes [{start}, {start + t.nbytes}] {where}; "
                                  f"tensors must tile the data with no gaps or overlaps")
        end, prev = start + t.nbytes, t.name
    if end != data_len:
        raise CheckpointError(f"{path}: the tensors cover {end} of the {data_len} data bytes; "
                              f"tensors must tile the data with no gaps or overlaps")


def _tensor_info(path: Path, name: str, meta, base: int, data_len: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: tensor {_short(name)} has a malformed header entry")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)):
        raise CheckpointError(f"{path}: tensor {_short(name)} has an invalid shape {_short(shape)} "
                              f"(at most {MAX_NDIM} non-negative integer dimensions)")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise CheckpointError(f"{path}: tensor {_short(name)} has invalid data_offsets {_short(offs)} (two integers)")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UnsupportedDtypeError(f"{path}: tensor {_short(name)} has dtype {_short(dtype)}; archkit reads only "
                                    f"{sorted(PLAIN_DTYPES)} (and {sorted(set(DTYPES) - set(PLAIN_DTYPES))} in "
                                    f"quantized weights)")
    begin, end = offs
    numel = 0 if 0 in shape else functools.reduce(lambda a, b: min(a * b, data_len + 1), shape, 1)  # capped: no bignums
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{path}: tensor {_short(name)} offsets [{begin}, {end}] fall outside the data ({data_len} bytes)")
    if end - begin != numel * DTYPES[dtype][1]:
        need = numel * DTYPES[dtype][1] if numel <= data_len else f"more than the {data_len} data bytes"
        raise CheckpointError(f"{path}: tensor {_short(name)} spans {end - begin} bytes but {dtype}{_short(shape)} needs {need}")
    return TensorInfo(name, path, dtype, tuple(shape), base + begin, end - begin)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The stored bits of one tensor as a fresh numpy array (BF16 as uint16); a quantized weight (core.quant) comes
    back dequantized, in its `dtype`."""
    if info.offset < 0:  # core.quant.QuantizedTensor: several stored tensors, no span of its own
        return info.dequantize()
    np_dtype, _ = DTYPES[info.dtype]
    arr = np.empty(info.numel, dtype=np_dtype)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(arr).cast("B"))
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {_short(info.name)} ({e.strerror or e})") from None
    if got != info.nbytes:
        del arr  # not kept alive by the traceback
        raise CheckpointError(f"{info.file}: tensor {_short(info.name)} is truncated ({got} of {info.nbytes} bytes)")
    return arr.reshape(info.shape)


def read_tensor_slice(info: TensorInfo, axis: int, start: int, stop: int) -> np.ndarray:
    """The stored bits of `info` sliced to [start, stop) along `axis`, reading only those bytes (a tensor-parallel
    rank's shard): one read when the slice is contiguous on disk, else one per index of the axes before `axis`."""
    if info.offset < 0:  # a quantized weight (core.quant): dequantized whole, then cut (its bytes are packed)
        x = read_tensor(info)
        return np.ascontiguousarray(x[(slice(None),) * axis + (slice(start, stop),)])
    np_dtype, size = DTYPES[info.dtype]
    shape = tuple(info.shape)
    if not (0 <= axis < len(shape) and 0 <= start <= stop <= shape[axis]):
        raise CheckpointError(f"{info.file}: slice [{start}:{stop}] of axis {axis} is outside tensor "
                              f"{_short(info.name)} of shape {list(shape)}")
    inner = math.prod(shape[axis + 1:])
    runs = 1 if (start, stop) == (0, shape[axis]) else math.prod(shape[:axis])  # whole rows tile: one read
    arr = np.empty(shape[:axis] + (stop - start,) + shape[axis + 1:], dtype=np_dtype)
    buf, chunk = memoryview(arr.reshape(-1)).cast("B"), arr.nbytes // max(runs, 1)
    try:
        with open(info.file, "rb") as f:
            for o in range(runs if chunk else 0):
                f.seek(info.offset + (o * shape[axis] + start) * inner * size)
                if f.readinto(buf[o * chunk:(o + 1) * chunk]) != chunk:
                    raise CheckpointError(f"{info.file}: tensor {_short(info.name)} is truncated")
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {_short(info.name)} ({e.strerror or e})") from None
    return arr


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


def _short(x, n: int = 200) -> str:
    """repr(x) cut to n characters (200: forged headers can hold megabytes in one value)."""
    return brief(x, n)
