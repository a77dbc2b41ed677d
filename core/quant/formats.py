"""Readers of each format's `quantization_config` and tensor layout: GPTQ, AWQ, FP8 (compressed-tensors: ctensors.py).

A reader says which tensors make up a quantized module (`modules`), checks them against its config from the
headers alone (`build`: dtypes, shapes, group sizes, packed sizes; each problem one QuantizationError naming the
tensor and the rule) and returns the QuantizedTensor standing for the module's plain weight, whose `decode` reads
the parts and calls the format's reference dequantization (dequant.py).
"""

from __future__ import annotations

import math

import numpy as np

from ..safetensors_io import PLAIN_DTYPES, TensorInfo, _short
from ..errors import QuantizationError
from .dequant import awq as dq_awq, fp8 as dq_fp8, gptq as dq_gptq
from .base import QuantizedTensor, Scheme, read_part
from .pack import PACKED_BITS

INT_TYPES = ("I32", "I64")  # index tensors (g_idx, weight_shape): transformers writes int32 or int64
FP8_TYPES = ("F8_E4M3", "F8_E5M2")


# -- checks shared by the readers -----------------------------------------------------------------------------------

def fail(info: TensorInfo, rule: str):
    """Raise the QuantizationError for tensor `info` breaking `rule`."""
    raise QuantizationError(f"{info.file}: tensor {_short(info.name)} {rule}")


def need(parts: dict, prefix: str, suffix: str, dtypes, method: str) -> TensorInfo:
    """Part `suffix` of the module, which must exist and be stored in one of `dtypes`."""
    info = parts.get(suffix)
    if info is None:
        anyone = next(iter(parts.values()))
        raise QuantizationError(f"{anyone.file}: quantized module {_short(prefix)} has no {suffix!r} tensor "
                                f"({method} stores a weight as {' + '.join(sorted({*parts, suffix}))})")
    if info.dtype not in dtypes:
        fail(info, f"has dtype {info.dtype!r}; {method} stores {suffix} as {' or '.join(dtypes)}")
    return info


def shape_is(info: TensorInfo, want, why: str) -> None:
    """QuantizationError unless `info` has shape `want`."""
    if tuple(info.shape) != tuple(want):
        fail(info, f"is {list(info.shape)}, expected {list(want)} ({why})")


def two_d(info: TensorInfo) -> tuple[int, int]:
    """The shape of a packed or quantized matrix, which must be 2-D."""
    if len(info.shape) != 2:
        fail(info, f"is {list(info.shape)}; a quantized weight is a 2-D matrix (3-D fused experts are not read)")
    return info.shape


def config_value(qc: dict, key: str, source: str, check, rule: str, default=None, where="quantization_config"):
    """qc[key] (or `default` when absent), which must pass `check`; `where` names qc in the message."""
    v = qc.get(key, default)
    if not check(v):
        raise QuantizationError(f"{source}: {where}.{key}={_short(v)} {rule}")
    return v


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def group_of(k: int, group_size: int, info: TensorInfo) -> int:
    """The number of groups along an input of k columns; the group size must divide it."""
    g = k if group_size == -1 else group_size
    if k % g:
        fail(info, f"has {k} input columns, which group_size {group_size} does not divide")
    return k // g


def module(prefix: str, parts: dict, shape, dtype: str, scheme: Scheme, decode) -> QuantizedTensor:
    """The QuantizedTensor `<prefix>.weight` made of `parts`."""
    anchor = next(iter(parts.values()))
    return QuantizedTensor(f"{prefix}.weight", anchor.file, dtype, tuple(int(s) for s in shape), -1,
                           sum(i.nbytes for i in parts.values()), tuple(sorted(parts.items())), scheme, decode)


def checked_groups(q: QuantizedTensor, g_idx: np.ndarray, groups: int) -> np.ndarray:
    """g_idx as int64, every entry a group in [0, groups) (a wrong one would index another row's scale)."""
    g = np.asarray(g_idx, np.int64).reshape(-1)
    bad = (g < 0) | (g >= groups)
    if bad.any():
        fail(q.part("g_idx") or q.part("weight_g_idx"),
             f"maps input column {int(np.argmax(bad))} to group {int(g[bad][0])}, outside [0, {groups})")
    return g


class Reader:
    """A format's reader (see the module docstring). Subclasses set method, anchors (suffixes marking a quantized
    module), suffixes (all its parts) and not_emulated (activation / KV-cache scales, skipped)."""

    method = ""
    anchors: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    not_emulated: tuple[str, ...] = ()
    activations = False  # the config quantizes activations too (which archkit does not emulate)

    def modules(self, tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
        """Module prefix → {suffix: tensor} for every module holding an anchor (or only skipped scales)."""
        marks = set(self.anchors) | set(self.not_emulated)
        prefixes = sorted({n.rsplit(".", 1)[0] for n in tensors if "." in n and n.rsplit(".", 1)[1] in marks})
        return {p: {s: tensors[f"{p}.{s}"] for s in (*self.suffixes, *self.not_emulated) if f"{p}.{s}" in tensors}
                for p in prefixes}

    def build(self, prefix: str, parts: dict[str, TensorInfo]) -> QuantizedTensor:
        raise NotImplementedError


# -- GPTQ ---------------------------------------------------------------------------------------------------------

class GPTQ(Reader):
    """GPTQ as AutoGPTQ, GPTQModel and optimum write it: qweight, qzeros, scales, g_idx per Linear (see
    dequant.gptq). checkpoint_format "gptq" (v1, the default) stores zero points minus one; "gptq_v2" as they are."""

    method = "gptq"
    anchors = ("qweight",)
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, qc: dict, source: str):
        self.bits = config_value(qc, "bits", source, lambda v: v in PACKED_BITS,
                                 "is not supported (archkit reads 2, 4 and 8 bits; 3-bit GPTQ packs across words)")
        self.group_size = config_value(qc, "group_size", source, lambda v: is_int(v) and (v == -1 or v > 0),
                                       "must be -1 (one group per column) or a positive integer", -1)
        self.desc_act = config_value(qc, "desc_act", source, lambda v: isinstance(v, bool), "must be true or false",
                                     False)
        self.sym = config_value(qc, "sym", source, lambda v: isinstance(v, bool), "must be true or false", True)
        self.layout = config_value(qc, "checkpoint_format", source, lambda v: v in ("gptq", "gptq_v2"),
                                   "is not supported (archkit reads 'gptq' and 'gptq_v2')", "gptq")
        config_value(qc, "pack_dtype", source, lambda v: v == "int32",
                     "is not supported (archkit reads qweight packed in int32 words)", "int32")
        config_value(qc, "dynamic", source, lambda v: v is None or (isinstance(v, dict) and all(
            isinstance(k, str) and k.startswith("-:") for k in v)),
            "overrides bits or groups per module, which archkit does not read (only '-:' exclusions)", None)

    def build(self, prefix, parts):
        bits = self.bits
        qweight = need(parts, prefix, "qweight", ("I32",), "GPTQ")
        rows, n = two_d(qweight)
        k = rows * 32 // bits
        g = group_of(k, self.group_size, qweight)
        scales = need(parts, prefix, "scales", PLAIN_DTYPES, "GPTQ")
        shape_is(scales, (g, n), f"one scale per group of {self.group_size} input columns and output column")
        qzeros = need(parts, prefix, "qzeros", ("I32",), "GPTQ")
        shape_is(qzeros, (g, math.ceil(n * bits / 32)), f"{n} output columns of {bits}-bit zero points per group")
        if "g_idx" in parts:
            shape_is(need(parts, prefix, "g_idx", INT_TYPES, "GPTQ"), (k,), "one group index per input column")
        elif self.desc_act:
            need(parts, prefix, "g_idx", INT_TYPES, "GPTQ with desc_act")
        scheme = Scheme("gptq", self.layout, "int", bits, self.sym, "channel" if self.group_size == -1 else "group",
                        None if self.group_size == -1 else self.group_size, act_order=self.desc_act)
        return module(prefix, parts, (n, k), scales.dtype, scheme, self._decode)

    def _decode(self, q: QuantizedTensor) -> np.ndarray:
        n, k = q.shape[::-1] if q.transposed else q.shape
        groups = q.part("scales").shape[0]
        g_idx = read_part(q, "g_idx")
        g = np.arange(k) // (k // groups) if g_idx is None else checked_groups(q, g_idx, groups)
        return dq_gptq(read_part(q, "qweight"), read_part(q, "qzeros"), read_part(q, "scales"), g, self.bits,
                            self.layout == "gptq", q.dtype)


# -- AWQ ----------------------------------------------------------------------------------------------------------

class AWQ(Reader):
    """AutoAWQ's GEMM layout (the one transformers and vLLM read as "awq"): qweight, qzeros, scales per Linear."""

    method = "awq"
    anchors = ("qweight",)
    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, qc: dict, source: str):
        bits_key = "w_bit" if "w_bit" in qc and "bits" not in qc else "bits"  # AutoAWQ's own quant_config says w_bit
        config_value(qc, bits_key, source, lambda v: v == 4, "is not supported (AWQ's GEMM layout is 4-bit)", 4)
        gs_key = "q_group_size" if "q_group_size" in qc and "group_size" not in qc else "group_size"
        self.group_size = config_value(qc, gs_key, source, lambda v: is_int(v) and (v == -1 or v > 0),
                                       "must be -1 or a positive integer", 128)
        config_value(qc, "version", source, lambda v: isinstance(v, str) and v.lower() == "gemm",
                     "is not supported (archkit reads AutoAWQ's 'gemm' packing; 'gemv' and the others order "
                     "the words differently)", "gemm")
        self.zero_point = config_value(qc, "zero_point", source, lambda v: isinstance(v, bool),
                                       "must be true or false", True)

    def build(self, prefix, parts):
        qweight = need(parts, prefix, "qweight", ("I32",), "AWQ")
        k, words = two_d(qweight)
        scales = need(parts, prefix, "scales", PLAIN_DTYPES, "AWQ")
        n = two_d(scales)[1]
        if words != math.ceil(n / 8):
            fail(qweight, f"packs {words * 8} output columns per row, but its scales have {n} ({math.ceil(n / 8)} "
                          f"words of eight 4-bit values expected)")
        g = group_of(k, self.group_size, qweight)
        shape_is(scales, (g, n), f"one scale per group of {self.group_size} input rows and output column")
        shape_is(need(parts, prefix, "qzeros", ("I32",), "AWQ"), (g, words), "4-bit zero points packed like qweight")
        scheme = Scheme("awq", "awq-gemm", "int", 4, not self.zero_point,
                        "channel" if self.group_size == -1 else "group",
                        None if self.group_size == -1 else self.group_size)
        return module(prefix, parts, (n, k), scales.dtype, scheme, self._decode)

    def _decode(self, q: QuantizedTensor) -> np.ndarray:
        k = q.part("qweight").shape[0]
        return dq_awq(read_part(q, "qweight"), read_part(q, "qzeros"), read_part(q, "scales"),
                           k // q.part("scales").shape[0], q.dtype)


# -- FP8 ----------------------------------------------------------------------------------------------------------

class FP8(Reader):
    """transformers' "fp8" quant_method (FineGrainedFP8: DeepSeek-V3, Qwen3-*-FP8): an F8 `weight` with
    `weight_scale_inv` per block of weight_block_size (128 x 128), or without a block size one scale per tensor or
    per output channel (`weight_scale_inv` or `weight_scale`). The scale multiplies, despite its name."""

    method = "fp8"
    anchors = ("weight_scale_inv", "weight_scale")
    suffixes = ("weight", "weight_scale_inv", "weight_scale")

    def __init__(self, qc: dict, source: str):
        self.block = config_value(qc, "weight_block_size", source, lambda v: v is None or (
            isinstance(v, list) and len(v) == 2 and all(is_int(b) and b > 0 for b in v)),
            "must be null or two positive integers [rows, cols]", None)
        scheme = config_value(qc, "activation_scheme", source, lambda v: v in ("dynamic", "static"),
                              "must be 'dynamic' or 'static'", "dynamic")
        self.not_emulated = ("input_scale",) if scheme == "static" else ()
        self.activations = True  # transformers' FP8 linear rounds activations to FP8 too, per token group

    def build(self, prefix, parts):
        weight = need(parts, prefix, "weight", FP8_TYPES, "FP8")
        n, k = two_d(weight)
        names = [s for s in ("weight_scale_inv", "weight_scale") if s in parts]
        if len(names) != 1:
            fail(weight, f"has {' and '.join(names)}; an FP8 weight has exactly one scale tensor")
        scale = need(parts, prefix, names[0], PLAIN_DTYPES, "FP8")
        if self.block:
            br, bc = self.block
            shape_is(scale, (math.ceil(n / br), math.ceil(k / bc)), f"one scale per {br}x{bc} block")
            strategy, block = "block", (br, bc)
        elif math.prod(scale.shape) == 1:
            strategy, block = "tensor", (n, k)
        elif tuple(scale.shape) in ((n,), (n, 1)):
            strategy, block = "channel", (1, k)
        else:
            fail(scale, f"is {list(scale.shape)}; without weight_block_size an FP8 scale is one number (per tensor) "
                        f"or [{n}, 1] (per output channel)")
        scheme = Scheme("fp8", "fp8", "float", 8, True, strategy, block=self.block and tuple(self.block))
        return module(prefix, parts, (n, k), scale.dtype, scheme,
                      lambda q: dq_fp8(read_part(q, "weight"), weight.dtype, read_part(q, names[0]),
                                            q.dtype, block))
