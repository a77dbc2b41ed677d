"""The pieces every quantized format's reader builds on: Scheme (what one quantized weight is), QuantizedTensor (the
stand-in for a plain weight), QuantizedStack (a per-expert role's QuantizedTensors, as a backend is handed them) and
read_part. (core/quant/__init__.py's view() drives the readers in formats.py and ctensors.py.)"""

from __future__ import annotations

import attrs
import numpy as np

from ..safetensors_io import TensorInfo, read_tensor


@attrs.frozen
class Scheme:
    """How one quantized weight is stored: the method and layout, the number kind and width, and what shares a scale."""

    method: str  # quant_method: "gptq", "awq", "fp8" or "compressed-tensors"
    layout: str  # "gptq" (v1 zero points), "gptq_v2", "awq-gemm", "fp8", "pack-quantized", "naive-quantized", ...
    kind: str  # "int" or "float"
    bits: int
    symmetric: bool
    strategy: str  # "tensor", "channel", "group" or "block"
    group_size: int | None = None  # strategy "group"
    block: tuple[int, int] | None = None  # strategy "block": (rows, cols) sharing a scale
    act_order: bool = False  # a g_idx maps input columns to groups

    def describe(self) -> str:
        """E.g. "int4 symmetric, group 128" or "float8 (F8_E4M3), block 128x128"."""
        kind = f"int{self.bits}" if self.kind == "int" else "float8"
        share = {"tensor": "per tensor", "channel": "per channel", "group": f"group {self.group_size}",
                 "block": f"block {self.block[0]}x{self.block[1]}" if self.block else "block"}[self.strategy]
        sym = "" if self.kind == "float" else (" symmetric" if self.symmetric else " asymmetric")
        return f"{kind}{sym}, {share}" + (", act-order (g_idx)" if self.act_order else "")


@attrs.frozen
class QuantizedTensor(TensorInfo):
    """A quantized module's tensors standing in for its plain weight: `name` is the plain weight's name, `shape` its
    shape [out, in] (or [in, out] once transposed for a family storing that layout), `dtype` the dtype the dense
    weight is computed in (the scales' dtype), `nbytes` the bytes its parts hold. `offset` is -1: there is no single
    span of bytes to read (read_tensor dequantizes instead)."""

    parts: tuple[tuple[str, TensorInfo], ...] = ()  # (suffix, stored tensor): "qweight", "weight_scale", ...
    scheme: Scheme | None = None
    decode: object = None  # (QuantizedTensor) -> float32 ndarray [out, in]: the format's reference dequantization
    transposed: bool = False

    def part(self, suffix: str) -> TensorInfo | None:
        """The stored tensor `<module>.<suffix>`, or None."""
        return dict(self.parts).get(suffix)

    def dequantize(self) -> np.ndarray:
        """The dense weight, in `dtype`'s stored form (F16 as float16, BF16 as uint16 bits, F32 as float32)."""
        w = self.decode(self)
        if self.transposed:
            w = np.ascontiguousarray(w.T)
        assert w.shape == tuple(self.shape), (self.name, w.shape, self.shape)
        return w

    def as_transposed(self) -> QuantizedTensor:
        """The same weight as [in, out]: quantized formats store a Linear's [out, in] orientation, and a family whose
        plain checkpoints hold [in, out] (GPT-2's Conv1D) asks for that layout."""
        return attrs.evolve(self, shape=tuple(self.shape[::-1]), transposed=not self.transposed)


@attrs.frozen
class QuantizedStack:
    """The quantized weights of a per-expert role, one QuantizedTensor per expert in expert order (a family's
    `experts.{expert}` tensors, which loading stacks into the role's [num_experts, out, in]): what core.load hands a
    backend that keeps experts quantized (core.weights Source.stored), instead of the stacked dense weight."""

    experts: tuple[QuantizedTensor, ...]

    @property
    def name(self) -> str:
        """The first expert's weight name (for messages)."""
        return self.experts[0].name

    @property
    def shape(self) -> tuple[int, ...]:
        """[num_experts, out, in]: the stacked role's shape."""
        return (len(self.experts),) + tuple(self.experts[0].shape)


def read_part(q: QuantizedTensor, suffix: str) -> np.ndarray | None:
    """The stored data of part `suffix` of `q` (None if absent)."""
    info = q.part(suffix)
    return None if info is None else read_tensor(info)
