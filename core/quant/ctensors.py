"""compressed-tensors checkpoints (llm-compressor's, and what `archkit quantize` writes): quantization_config with
`config_groups` (targets → a scheme's weight args), `ignore`, a `format` (per group or for the whole model).

Formats read: `pack-quantized` (int, `weight_packed` + `weight_shape`, zero points packed down the columns),
`naive-quantized` and `int-quantized` (int8 `weight`), `float-quantized` (FP8 `weight`); each with `weight_scale`
per tensor, channel, group or block, symmetric or not (`weight_zero_point`), and `weight_g_idx` where activation
ordering wrote one. A module is matched to its group as compressed-tensors does: an exact name first, then a
`re:` regex (re.match), then a class name — which archkit cannot see, so a class target (`Linear`) matches any
module that stores quantized tensors.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..safetensors_io import PLAIN_DTYPES, _short, read_tensor
from ..errors import QuantizationError
from .dequant import ct_packed as dq_ct_packed, ct_packed_zero as dq_ct_packed_zero, fp8 as dq_fp8, int_weight as dq_int_weight
from .base import QuantizedTensor, Scheme, read_part
from .formats import (FP8_TYPES, INT_TYPES, Reader, checked_groups, config_value, fail, is_int, module, need, shape_is,
                      two_d)
from .pack import PACKED_BITS

FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")
ACTIVATION_SCALES = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")
KV_SCALES = ("k_scale", "v_scale", "k_zero_point", "v_zero_point", "q_scale")


class CompressedTensors(Reader):
    """The compressed-tensors reader (see the module docstring)."""

    method = "compressed-tensors"
    anchors = ("weight_packed", "weight_scale")
    suffixes = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
                "weight_global_scale")

    def __init__(self, qc: dict, source: str):
        self.source = source
        top = config_value(qc, "format", source, lambda v: v is None or isinstance(v, str), "must be a string", None)
        groups = config_value(qc, "config_groups", source, lambda v: isinstance(v, dict) and v and all(
            isinstance(g, dict) for g in v.values()), "must be a non-empty object of scheme objects")
        self.ignore = config_value(qc, "ignore", source, lambda v: v is None or (
            isinstance(v, list) and all(isinstance(t, str) for t in v)), "must be a list of module names", None) or []
        # Not "compressed": the weights were saved dense (fake-quantized), their scales beside them.
        self.dense = qc.get("quantization_status", "compressed") != "compressed"
        self.groups = {name: self._scheme(name, g, top) for name, g in groups.items()}
        self.patterns = {t: self._regex(t) for targets, _ in self.groups.values() for t in (*targets, *self.ignore)
                         if t.startswith("re:")}
        acts = any(g.get("input_activations") or g.get("output_activations") for g in groups.values())
        self.not_emulated = (ACTIVATION_SCALES if acts else ()) + (KV_SCALES if qc.get("kv_cache_scheme") else ())
        self.activations = acts

    def _scheme(self, name: str, g: dict, top: str | None) -> tuple[list[str], Scheme | None]:
        """(targets, Scheme of the group's weights, or None when it quantizes activations only)."""
        key = f"config_groups.{name}"
        targets = g.get("targets")
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            raise QuantizationError(f"{self.source}: quantization_config.{key}.targets={_short(targets)} must be a "
                                    f"non-empty list of module names, re: patterns or class names")
        w = g.get("weights")
        if w is None:
            return targets, None
        if not isinstance(w, dict):
            raise QuantizationError(f"{self.source}: quantization_config.{key}.weights must be an object")
        fmt = g.get("format") or top
        if fmt not in FORMATS and not self.dense:  # saved uncompressed: format "dense", the weights as they are
            raise QuantizationError(f"{self.source}: quantization_config.{key} has format {_short(fmt)}, which is "
                                    f"not supported (archkit reads {', '.join(FORMATS)})")

        def arg(k, check, rule, default=None):
            return config_value(w, k, self.source, check, rule, default, f"quantization_config.{key}.weights")

        kind = str(arg("type", lambda v: str(v).lower() in ("int", "float"), "must be 'int' or 'float'", "int")).lower()
        bits = arg("num_bits", lambda v: is_int(v) and 1 <= v <= 8, "must be an integer in [1, 8]", 8)
        if fmt == "pack-quantized" and bits not in PACKED_BITS:
            arg("num_bits", lambda v: False, "is not supported by pack-quantized here (archkit reads 2, 4 and 8; "
                "other widths straddle words, packed differently across compressed-tensors versions)")
        if kind == "float" and bits != 8:
            arg("num_bits", lambda v: False, "is not supported for type float (archkit reads FP8 only)")
        if (kind == "float") != (fmt == "float-quantized") and fmt in FORMATS and fmt != "naive-quantized":
            raise QuantizationError(f"{self.source}: quantization_config.{key}: format {fmt!r} does not hold "
                                    f"{kind} weights")
        sym = arg("symmetric", lambda v: isinstance(v, bool), "must be true or false", True)
        if kind == "float" and not sym:
            arg("symmetric", lambda v: False, "is not supported for float weights (FP8 has no zero point)")
        arg("dynamic", lambda v: v is False or v is None, "must be false: weights have stored scales", False)
        gs = arg("group_size", lambda v: v is None or (is_int(v) and (v > 0 or v == -1)),
                 "must be null, -1 or a positive integer")
        strategy = arg("strategy", lambda v: v is None or v in STRATEGIES,
                       f"is not supported for weights (archkit reads {', '.join(STRATEGIES)})")
        strategy = strategy or ("tensor" if gs is None else "channel" if gs == -1 else "group")
        if strategy == "group" and not (is_int(gs) and gs > 0):
            arg("group_size", lambda v: False, "must be a positive integer with strategy 'group'")
        block = None
        if strategy == "block":
            block = tuple(arg("block_structure", lambda v: isinstance(v, list) and len(v) == 2 and all(
                is_int(b) and b > 0 for b in v), "must be two positive integers [rows, cols] with strategy 'block'"))
        return targets, Scheme("compressed-tensors", "dense" if self.dense else fmt, kind, bits, sym, strategy,
                               gs if strategy == "group" else None, block, bool(w.get("actorder")))

    def _regex(self, target: str) -> re.Pattern:
        """A `re:` target compiled; QuantizationError naming it when it is not a regular expression."""
        try:
            return re.compile(target[3:])
        except (re.error, RecursionError, OverflowError) as e:
            raise QuantizationError(f"{self.source}: quantization_config target {_short(target)} is not a valid "
                                    f"regular expression ({e})") from None

    def _matches(self, target: str, prefix: str) -> bool:
        """compressed-tensors' match_name: an exact name, or a `re:` pattern matching from the start."""
        return target == prefix or (target.startswith("re:") and self.patterns[target].match(prefix) is not None)

    def _group(self, prefix: str, anchor) -> Scheme:
        """The scheme of the group targeting module `prefix`, by compressed-tensors' precedence."""
        best = None
        for name, (targets, scheme) in self.groups.items():
            if scheme is None:
                continue
            for t in targets:
                rank = 0 if t == prefix else 1 if self._matches(t, prefix) else \
                    2 if t.isidentifier() and t[:1].isupper() else None
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, scheme)
        for t in self.ignore:
            if self._matches(t, prefix):
                fail(anchor, f"is stored quantized, but quantization_config.ignore lists its module ({t!r})")
        if best is None:
            fail(anchor, "is stored quantized, but no quantization_config.config_groups target matches its module")
        return best[1]

    def build(self, prefix, parts):
        anchor = parts.get("weight_packed") or parts.get("weight_scale")
        s = self._group(prefix, anchor)
        if "weight_global_scale" in parts:
            fail(parts["weight_global_scale"], "is a tensor-group global scale (NVFP4), which archkit does not read")
        if s.layout == "dense":
            n, k = two_d(need(parts, prefix, "weight", PLAIN_DTYPES, "a not-yet-compressed compressed-tensors"))
            return module(prefix, parts, (n, k), parts["weight"].dtype, s, lambda q: read_part(q, "weight"))
        if s.layout == "pack-quantized":
            if "weight" in parts:
                fail(parts["weight"], f"is stored both plain and quantized ({prefix}.weight_packed); a weight is one "
                                      f"or the other")
            packed = need(parts, prefix, "weight_packed", ("I32",), "pack-quantized")
            n, words = two_d(packed)
            k = self._packed_columns(prefix, parts, packed, s.bits)
        else:
            dtypes = FP8_TYPES if s.kind == "float" else ("I8",)
            n, k = two_d(need(parts, prefix, "weight", dtypes, f"{s.layout} ({s.kind}{s.bits})"))
        scale = need(parts, prefix, "weight_scale", PLAIN_DTYPES, s.layout)
        block = self._check_scale(scale, s, n, k)
        zp = self._check_zero(prefix, parts, s, n, scale)
        if "weight_g_idx" in parts:
            if s.strategy != "group":
                fail(parts["weight_g_idx"], f"maps columns to groups, but the strategy is {s.strategy!r}")
            shape_is(need(parts, prefix, "weight_g_idx", INT_TYPES, s.layout), (k,), "one group per input column")
        if zp is None:
            parts = {x: i for x, i in parts.items() if x != "weight_zero_point"}  # symmetric: not applied
        return module(prefix, parts, (n, k), scale.dtype, s, lambda q: _decode(q, s, block))

    def _packed_columns(self, prefix, parts, packed, bits: int) -> int:
        """K, from the 2-element weight_shape [N, K] (the one tensor whose data the view reads: the packed width
        pins K only to within 32 / bits), checked against the packed tensor."""
        info = need(parts, prefix, "weight_shape", INT_TYPES, "pack-quantized")
        shape_is(info, (2,), "the weight's [rows, columns]")
        n, k = (int(v) for v in read_tensor(info))
        words = packed.shape[1]
        if n != packed.shape[0] or k < 0 or words != math.ceil(k * bits / 32):
            fail(packed, f"is {list(packed.shape)}, but weight_shape says [{n}, {k}], which packs to "
                         f"[{n}, {math.ceil(max(k, 0) * bits / 32)}] at {bits} bits")
        return k

    def _check_scale(self, scale, s: Scheme, n: int, k: int) -> tuple[int, int]:
        """Check the scale's shape for the strategy; return the block of elements one scale covers."""
        if s.strategy == "tensor":
            if math.prod(scale.shape) != 1:
                fail(scale, f"is {list(scale.shape)}; strategy 'tensor' has one scale")
            return n, k
        if s.strategy == "channel":
            if tuple(scale.shape) not in ((n, 1), (n,)):
                fail(scale, f"is {list(scale.shape)}, expected [{n}, 1] (strategy 'channel': one per output row)")
            return 1, k
        if s.strategy == "group":
            if k % s.group_size:
                fail(scale, f"belongs to a weight of {k} input columns, which group_size {s.group_size} does not "
                            f"divide")
            shape_is(scale, (n, k // s.group_size), f"strategy 'group': one per row and group of {s.group_size}")
            return 1, s.group_size
        shape_is(scale, (math.ceil(n / s.block[0]), math.ceil(k / s.block[1])), f"one per {s.block[0]}x"
                 f"{s.block[1]} block")
        return s.block

    def _check_zero(self, prefix, parts, s: Scheme, n: int, scale):
        """The zero-point tensor of an asymmetric scheme, checked (None when symmetric)."""
        if s.symmetric:
            return None
        packed = s.layout == "pack-quantized" and s.strategy in ("group", "channel")
        zp = need(parts, prefix, "weight_zero_point", ("I32",) if packed else ("I8",), f"asymmetric {s.layout}")
        cols = scale.shape[1] if len(scale.shape) == 2 else 1
        if packed:
            shape_is(zp, (math.ceil(n * s.bits / 32), cols), f"{s.bits}-bit zero points packed down the columns")
        elif math.prod(zp.shape) != math.prod(scale.shape):
            fail(zp, f"is {list(zp.shape)}; there is one zero point per scale ({list(scale.shape)})")
        return zp


def _decode(q: QuantizedTensor, s: Scheme, block: tuple[int, int]) -> np.ndarray:
    """Dequantize a compressed-tensors weight (dequant.py does the arithmetic)."""
    n, k = q.shape[::-1] if q.transposed else q.shape
    scale = read_part(q, "weight_scale")
    if s.kind == "float":
        return dq_fp8(read_part(q, "weight"), q.part("weight").dtype, scale, q.dtype, block)
    values = dq_ct_packed(read_part(q, "weight_packed"), s.bits, (n, k)) if s.layout == "pack-quantized" \
        else read_part(q, "weight")
    zero = read_part(q, "weight_zero_point")
    if zero is not None and zero.dtype == np.int32:  # packed (group / channel strategies of pack-quantized)
        zero = dq_ct_packed_zero(zero, s.bits, n)
    g_idx = read_part(q, "weight_g_idx")
    if g_idx is not None:
        g_idx = checked_groups(q, g_idx, k // s.group_size)
    return dq_int_weight(values, scale, q.dtype, zero, block, g_idx)
