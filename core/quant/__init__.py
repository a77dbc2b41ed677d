"""Quantized checkpoints (GPTQ, AWQ, FP8, compressed-tensors) seen as the plain checkpoints they stand for.

A quantized linear layer is stored as several tensors named after its module — `...q_proj.qweight`, `.qzeros`,
`.scales` (GPTQ, AWQ); `...q_proj.weight_packed`, `.weight_scale`, `.weight_shape` (compressed-tensors);
`...q_proj.weight` in FP8 with `.weight_scale_inv` (FP8) — where the plain checkpoint has `...q_proj.weight`.
`view()` groups them, checks them against the checkpoint's `quantization_config` (headers only, plus the tiny
`weight_shape` tensors), and replaces each group by one QuantizedTensor named `...q_proj.weight`, of the plain
weight's shape [out, in], whose data is the dense weight, dequantized when it is read. Everything downstream —
detection, a family's weight patterns, shape checks, the backends — sees a plain checkpoint: a family (a plugin's
included) needs nothing to load a quantized checkpoint, and modules left unquantized (`ignore`,
`modules_to_not_convert`, lm_head) are the plain tensors they are stored as.

The dense weight comes out in the scales' dtype (as the reference implementations compute it; see dequant.py), one
tensor at a time, so loading holds one dense tensor more than a plain load does. Activation quantization (static
`input_scale`s, compressed-tensors' input_activations) and KV-cache scales are not emulated: activations and the cache
stay in the backend's dtype, and those tensors are skipped with a warning.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ..safetensors_io import PLAIN_DTYPES, TensorInfo, _short
from ..config import read_json
from ..errors import QuantizationError, UnsupportedDtypeError
from ..log import warn_once
from .base import QuantizedStack, QuantizedTensor, Scheme, read_part  # noqa: F401  (core.quant's surface)
from .ctensors import CompressedTensors
from .formats import AWQ, FP8, GPTQ, Reader


@attrs.frozen
class Quantization:
    """What `view()` found, for `archkit inspect`: the method, each scheme with its tensor count, bytes."""

    method: str
    schemes: tuple[tuple[Scheme, int], ...]
    stored_bytes: int  # the quantized modules' parts
    numel: int  # the elements of the dense weights they stand for
    skipped: tuple[str, ...] = ()  # activation / KV-cache scales not used

    def describe(self) -> list[str]:
        """Lines for `archkit inspect`: scheme, bits, group size, bytes (and bits per weight, scales included)."""
        n = sum(c for _, c in self.schemes)
        lines = [f"{self.method}: {n} quantized weights, {self.stored_bytes / 1e6:,.1f} MB stored for "
                 f"{self.numel:,} weights ({8 * self.stored_bytes / max(self.numel, 1):.2f} bits each, scales "
                 f"included; {2 * self.numel / 1e6:,.1f} MB in 16 bits)"]
        lines += [f"{s.layout}: {s.describe()} ({c} weights)" for s, c in self.schemes]
        if self.skipped:
            lines.append(f"not emulated (left out): {len(self.skipped)} activation / KV-cache scale tensors")
        return lines


def view(path: Path, config: dict | None, tensors: dict[str, TensorInfo]
         ) -> tuple[dict[str, TensorInfo], Quantization | None]:
    """The checkpoint's tensors with every quantized module replaced by one QuantizedTensor (see the module
    docstring), and a summary (None for a plain checkpoint).

    Raises QuantizationError naming the tensor (or config key) and the rule for a malformed or unsupported
    quantization, and UnsupportedDtypeError for an integer or FP8 tensor that no quantized module explains.
    """

    qc = config.get("quantization_config") if isinstance(config, dict) else None
    source = path / "config.json"
    if qc is None and (path / "quantize_config.json").is_file() and any(n.endswith(".qweight") for n in tensors):
        source = path / "quantize_config.json"  # AutoGPTQ's own file: older GPTQ checkpoints have only this one
        qc = read_json(source, "quantize_config.json", QuantizationError)
    if qc is None:
        _check_plain(tensors, path, None)
        return tensors, None
    reader = reader_for(qc, str(source))
    out = dict(tensors)
    quantized: list[QuantizedTensor] = []
    skipped: list[str] = []
    for prefix, parts in reader.modules(tensors).items():
        for info in parts.values():
            del out[info.name]
        skipped += [info.name for suffix, info in parts.items() if suffix in reader.not_emulated]
        parts = {suffix: info for suffix, info in parts.items() if suffix not in reader.not_emulated}
        if not parts:  # a module holding only KV-cache scales (self_attn.k_scale)
            continue
        q = reader.build(prefix, parts)
        if q.name in out:
            raise QuantizationError(f"{out[q.name].file}: tensor {_short(q.name)} is stored both plain and quantized "
                                    f"({_short(sorted(parts))}); a weight is one or the other")
        out[q.name] = q
        quantized.append(q)
    if skipped or reader.activations:
        what = f"its {len(skipped)} activation / KV-cache scales (e.g. {skipped[0]}) are not used" if skipped else \
            "its activation quantization is not emulated"
        warn_once(f"{path}: {what}: archkit dequantizes the weights only; activations and the KV cache run in the "
                  f"backend's dtype")
    _check_plain(out, path, reader.method)
    counts: dict[Scheme, int] = {}
    for q in quantized:
        counts[q.scheme] = counts.get(q.scheme, 0) + 1
    summary = Quantization(reader.method, tuple(counts.items()), sum(q.nbytes for q in quantized),
                           sum(q.numel for q in quantized), tuple(skipped))
    return out, summary


def _check_plain(tensors: dict[str, TensorInfo], path: Path, method: str | None) -> None:
    """UnsupportedDtypeError for a tensor left in a quantized-only dtype (integers, FP8): the backends read floats."""
    for info in tensors.values():
        if info.dtype not in PLAIN_DTYPES and not isinstance(info, QuantizedTensor):
            why = (f"no quantized module of this {method} checkpoint explains it" if method else
                   "config.json has no quantization_config that would explain it")
            raise UnsupportedDtypeError(f"{info.file}: tensor {_short(info.name)} has dtype {_short(info.dtype)} but "
                                        f"{why}; archkit reads only {sorted(PLAIN_DTYPES)} for plain weights")


def reader_for(qc, source: str) -> Reader:
    """The reader of a quantization_config; QuantizationError for an unknown or malformed one."""
    if not isinstance(qc, dict):
        raise QuantizationError(f"{source}: quantization_config must be a JSON object, got {type(qc).__name__}")
    readers = {"gptq": GPTQ, "awq": AWQ, "fp8": FP8, "compressed-tensors": CompressedTensors}
    method = qc.get("quant_method", "gptq" if "bits" in qc and source.endswith("quantize_config.json") else None)
    if method not in readers:
        raise QuantizationError(f"{source}: quantization_config.quant_method={_short(method)} is not supported "
                                f"(archkit reads {', '.join(sorted(readers))})")
    return readers[method](qc, source)
