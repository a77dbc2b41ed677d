"""Every malformed or unsupported quantized checkpoint (docs/bad-input.md, "Quantized checkpoints"), one test each.

As in test_errors.py: each row builds a small checkpoint with numpy alone (tinyckpt's llama layout, quantized by
`archkit quantize` or packed here by each format's layout), damages one thing, and checks that loading raises the
row's error (an ArchkitError) with a one-line message naming the offender and the rule, and that the `archkit`
command prints exactly that as `archkit: error: ...` and exits 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import pytest

import core
from core.cli import main as cli_main
from core.errors import ArchkitError, QuantizationError, UnsupportedDtypeError
from core.quant.pack import AWQ_ORDER, pack
from core.quant.quantize import quantize
from fakeplugins import assert_one_line_error, cli
from tinyckpt import LLAMA_CONFIG, edit_header, edit_json, write_checkpoint

MODULES = [f"model.layers.{i}.{m}" for i in range(LLAMA_CONFIG["num_hidden_layers"])
           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj")]
Q = "model.layers.0.self_attn.q_proj"  # [16, 16]
DOWN = "model.layers.0.mlp.down_proj"  # [16, 32]


@attrs.define
class Case:
    """One row: the error, the fragments its message must hold, the library call, the CLI arguments."""

    error: type
    fragments: list[str]
    call: Callable[[], object]
    cli: list


ROWS: dict[str, Callable[[Path], Case]] = {}


def row(fn):
    ROWS[fn.__name__] = fn
    return fn


def load_case(path: Path, error: type, *fragments: str) -> Case:
    return Case(error, list(fragments), lambda: core.load(path, device="cpu", quiet=True), ["inspect", path])


def retensor(path: Path, fn) -> None:
    """Rewrite model.safetensors: fn(dict of numpy arrays) mutates it."""
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def quant_config(path: Path, **qc) -> None:
    edit_json(path / "config.json", lambda d: d.update(quantization_config=qc))


def ct(tmp: Path, **kw) -> Path:
    """tinyckpt's llama quantized by `archkit quantize` (int4, groups of 16)."""
    quantize(write_checkpoint(tmp / "plain"), tmp / "ckpt", "w4a16", kw.pop("group", 16), **kw)
    return tmp / "ckpt"


def ct_qc(path: Path, fn) -> None:
    edit_json(path / "config.json", lambda d: fn(d["quantization_config"]))


def gptq(tmp: Path, bits: int = 4, group: int = 16, **extra) -> Path:
    """tinyckpt's llama with every linear weight replaced by GPTQ parts (AutoGPTQ layout)."""
    path = write_checkpoint(tmp / "ckpt", tokenizer=True)

    def fn(t):
        for m in MODULES:
            n, k = t.pop(m + ".weight").shape
            groups = k // (k if group == -1 else group)
            t[m + ".qweight"] = pack(np.full((k, n), 3), bits, axis=0)
            t[m + ".qzeros"] = pack(np.full((groups, n), 1), bits, axis=1)
            t[m + ".scales"] = np.full((groups, n), 0.01, np.float16)
            t[m + ".g_idx"] = (np.arange(k) // (k // groups)).astype(np.int32)
    retensor(path, fn)
    quant_config(path, **{"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                          "sym": True, **extra})
    return path


def awq(tmp: Path, **extra) -> Path:
    """tinyckpt's llama with AutoAWQ GEMM parts."""
    path = write_checkpoint(tmp / "ckpt")

    def fn(t):
        for m in MODULES:
            n, k = t.pop(m + ".weight").shape
            t[m + ".qweight"] = pack(np.full((k, n), 3), 4, axis=1, order=AWQ_ORDER)
            t[m + ".qzeros"] = pack(np.full((k // 16, n), 8), 4, axis=1, order=AWQ_ORDER)
            t[m + ".scales"] = np.full((k // 16, n), 0.01, np.float16)
    retensor(path, fn)
    quant_config(path, **{"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm",
                          **extra})
    return path


def fp8(tmp: Path, block=(8, 8), edit=lambda t: None) -> Path:
    """tinyckpt's llama with FP8 weights (codes of 1.0) and block scales (transformers' "fp8" method), edit()ed
    before it is written (safetensors' numpy API cannot read F8 back)."""
    path = write_checkpoint(tmp / "ckpt")

    def fn(t):
        for m in MODULES:
            n, k = t[m + ".weight"].shape
            t[m + ".weight"] = np.full((n, k), 0x38, np.uint8)  # written as U8, retyped F8_E4M3 below
            t[m + ".weight_scale_inv"] = np.full((-(-n // block[0]), -(-k // block[1])), 0.01, np.float32)
        edit(t)
    retensor(path, fn)
    edit_header(path / "model.safetensors", lambda h: [h[m + ".weight"].update(dtype="F8_E4M3") for m in MODULES])
    quant_config(path, quant_method="fp8", activation_scheme="dynamic", weight_block_size=list(block))
    return path


# -- quantization_config --------------------------------------------------------------------------------------------
@row
def quant_method_unknown(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q.update(quant_method="bitsandbytes"))
    return load_case(p, QuantizationError, "config.json", "quant_method='bitsandbytes'", "is not supported")


@row
def quantization_config_not_an_object(tmp):
    p = ct(tmp)
    edit_json(p / "config.json", lambda d: d.update(quantization_config=["gptq"]))
    return load_case(p, QuantizationError, "config.json", "quantization_config must be a JSON object")


@row
def quantized_tensors_without_config(tmp):
    p = ct(tmp)
    edit_json(p / "config.json", lambda d: d.pop("quantization_config"))
    return load_case(p, UnsupportedDtypeError, "model.safetensors", "has dtype 'I32'",
                     "no quantization_config that would explain it")


@row
def weight_stored_plain_and_quantized(tmp):
    p = ct(tmp)
    retensor(p, lambda t: t.update({Q + ".weight": np.zeros((16, 16), np.float32)}))
    return load_case(p, QuantizationError, repr(Q + ".weight"), "stored both plain and quantized")


# -- GPTQ -----------------------------------------------------------------------------------------------------------
@row
def gptq_bits_unsupported(tmp):
    p = gptq(tmp)
    edit_json(p / "config.json", lambda d: d["quantization_config"].update(bits=3))
    return load_case(p, QuantizationError, "quantization_config.bits=3", "is not supported")


@row
def gptq_group_not_dividing_columns(tmp):
    p = gptq(tmp, group=-1)
    edit_json(p / "config.json", lambda d: d["quantization_config"].update(group_size=12))
    return load_case(p, QuantizationError, repr(DOWN + ".qweight"), "has 32 input columns, which group_size 12 does "
                     "not divide")


@row
def gptq_scales_wrong_shape(tmp):
    p = gptq(tmp)
    retensor(p, lambda t: t.update({DOWN + ".scales": np.full((1, 16), 0.01, np.float16)}))
    return load_case(p, QuantizationError, repr(DOWN + ".scales"), "is [1, 16], expected [2, 16]")


@row
def gptq_qzeros_packed_size_disagrees(tmp):
    p = gptq(tmp)
    retensor(p, lambda t: t.update({Q + ".qzeros": np.zeros((1, 1), np.int32)}))
    return load_case(p, QuantizationError, repr(Q + ".qzeros"), "is [1, 1], expected [1, 2]",
                     "16 output columns of 4-bit zero points")


@row
def gptq_part_wrong_dtype(tmp):
    p = gptq(tmp)
    retensor(p, lambda t: t.update({Q + ".qweight": t[Q + ".qweight"].view(np.float32)}))
    return load_case(p, QuantizationError, repr(Q + ".qweight"), "has dtype 'F32'; GPTQ stores qweight as I32")


@row
def gptq_desc_act_without_g_idx(tmp):
    p = gptq(tmp, desc_act=True)
    retensor(p, lambda t: t.pop(Q + ".g_idx"))
    return load_case(p, QuantizationError, repr(Q), "has no 'g_idx' tensor")


@row
def gptq_g_idx_out_of_range(tmp):
    p = gptq(tmp)
    retensor(p, lambda t: t[Q + ".g_idx"].__setitem__(5, 7))
    # g_idx is data: checked as the weight is dequantized, so `archkit inspect` (headers only) does not see it
    return Case(QuantizationError, [repr(Q + ".g_idx"), "maps input column 5 to group 7, outside [0, 1)"],
                lambda: core.load(p, device="cpu", quiet=True),
                ["generate", p, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "1"])


@row
def gptq_checkpoint_format_unknown(tmp):
    p = gptq(tmp, checkpoint_format="marlin")
    return load_case(p, QuantizationError, "quantization_config.checkpoint_format='marlin'", "is not supported")


# -- AWQ ------------------------------------------------------------------------------------------------------------
@row
def awq_version_not_gemm(tmp):
    return load_case(awq(tmp, version="gemv"), QuantizationError, "quantization_config.version='gemv'",
                     "archkit reads AutoAWQ's 'gemm' packing")


@row
def awq_packed_size_disagrees(tmp):
    p = awq(tmp)
    retensor(p, lambda t: t.update({Q + ".scales": np.full((1, 24), 0.01, np.float16)}))
    return load_case(p, QuantizationError, repr(Q + ".qweight"), "packs 16 output columns per row, but its scales "
                     "have 24")


# -- FP8 ------------------------------------------------------------------------------------------------------------
@row
def fp8_scale_wrong_shape(tmp):
    p = fp8(tmp, edit=lambda t: t.update({DOWN + ".weight_scale_inv": np.ones((2, 2), np.float32)}))
    return load_case(p, QuantizationError, repr(DOWN + ".weight_scale_inv"), "is [2, 2], expected [2, 4]",
                     "one scale per 8x8 block")


@row
def fp8_block_size_malformed(tmp):
    p = fp8(tmp)
    ct_qc(p, lambda q: q.update(weight_block_size=[128]))
    return load_case(p, QuantizationError, "quantization_config.weight_block_size=[128]", "two positive integers")


# -- compressed-tensors ---------------------------------------------------------------------------------------------
@row
def ct_format_unsupported(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: (q.update(format="marlin-24"), q["config_groups"]["group_0"].pop("format")))
    return load_case(p, QuantizationError, "config_groups.group_0 has format 'marlin-24'", "not supported")


@row
def ct_bits_unsupported(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3))
    return load_case(p, QuantizationError, "config_groups.group_0.weights.num_bits=3", "is not supported by "
                     "pack-quantized")


@row
def ct_strategy_unsupported(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor_group"))
    return load_case(p, QuantizationError, "strategy='tensor_group'", "is not supported for weights")


@row
def ct_scale_wrong_shape(tmp):
    p = ct(tmp)
    retensor(p, lambda t: t.update({DOWN + ".weight_scale": np.ones((16, 3), np.float32)}))
    return load_case(p, QuantizationError, repr(DOWN + ".weight_scale"), "is [16, 3], expected [16, 2]")


@row
def ct_group_not_dividing_columns(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=12))
    return load_case(p, QuantizationError, "weight_scale'", "which group_size 12 does not divide")


@row
def ct_packed_size_disagrees(tmp):
    p = ct(tmp)
    retensor(p, lambda t: t.update({Q + ".weight_shape": np.array([16, 24], np.int64)}))
    return load_case(p, QuantizationError, repr(Q + ".weight_packed"), "weight_shape says [16, 24]",
                     "which packs to [16, 3] at 4 bits")


@row
def ct_part_missing(tmp):
    p = ct(tmp)
    retensor(p, lambda t: t.pop(Q + ".weight_scale"))
    return load_case(p, QuantizationError, repr(Q), "has no 'weight_scale' tensor")


@row
def ct_zero_point_missing(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False))
    return load_case(p, QuantizationError, repr(DOWN), "has no 'weight_zero_point' tensor")


@row
def ct_no_group_targets_module(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q["config_groups"]["group_0"].update(targets=["re:.*nothing$"]))
    return load_case(p, QuantizationError, "weight_packed'", "no quantization_config.config_groups target matches")


@row
def ct_target_not_a_regex(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q.update(ignore=["lm_head", "re:(unclosed"]))
    return load_case(p, QuantizationError, "target 're:(unclosed' is not a valid regular expression")


@row
def ct_module_ignored_but_quantized(tmp):
    p = ct(tmp)
    ct_qc(p, lambda q: q.update(ignore=["lm_head", "re:.*q_proj$"]))
    return load_case(p, QuantizationError, "q_proj.weight_packed'", "quantization_config.ignore lists its module")


# -- archkit quantize -----------------------------------------------------------------------------------------------
def quantize_case(src: Path, dst: Path, *fragments: str, group: int | None = None) -> Case:
    return Case(QuantizationError, list(fragments), lambda: quantize(src, dst, "w4a16", group),
                ["quantize", src, dst, "--scheme", "w4a16"] + (["--group-size", group] if group is not None else []))


@row
def quantize_destination_exists(tmp):
    src = write_checkpoint(tmp / "plain")
    (tmp / "out").mkdir()
    return quantize_case(src, tmp / "out", "out: already exists")


@row
def quantize_already_quantized(tmp):
    return quantize_case(ct(tmp), tmp / "out", "the checkpoint is already quantized (compressed-tensors)")


@row
def quantize_nothing_quantizable(tmp):
    return quantize_case(write_checkpoint(tmp / "plain"), tmp / "out", "no weight can be quantized",
                         "--group-size 7", group=7)


@row
def quantize_group_size_invalid(tmp):
    return quantize_case(write_checkpoint(tmp / "plain"), tmp / "out", "--group-size 0 must be a positive number",
                         group=0)


# -- the tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROWS))
def test_bad_quantized_input(name, tmp_path, capsys):
    case = ROWS[name](tmp_path)
    with pytest.raises(case.error) as ei:
        case.call()
    msg = str(ei.value)
    assert isinstance(ei.value, ArchkitError) and "\n" not in msg and len(msg) < 1000, msg
    for f in case.fragments:
        assert f in msg, (f, msg)
    capsys.readouterr()
    assert cli_main([str(a) for a in case.cli]) == 1  # the command, in process (one subprocess below)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0] == f"archkit: error: {msg}", lines


def test_one_line_error_from_the_real_command(tmp_path):
    case = ROWS["ct_scale_wrong_shape"](tmp_path)
    assert_one_line_error(cli(*case.cli), *case.fragments)


def test_every_row_is_documented():
    """docs/bad-input.md's quantization section has a row for every case here (by id), and no stale ones."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    section = doc.split("### Quantized checkpoints", 1)[1].split("\n### ", 1)[0]
    ids = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert set(ROWS) == ids


def test_intact_fixtures_load(tmp_path):
    """The undamaged checkpoints the rows start from load (so each row fails for its own damage)."""
    for i, make in enumerate((ct, gptq, awq, fp8)):
        model = core.load(make(tmp_path / str(i)), device="cpu", quiet=True)
        assert np.isfinite(model.logits([1, 2, 3])).all()
