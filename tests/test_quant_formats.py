"""Quantized checkpoints against oracles nobody here wrote (CPU).

- compressed-tensors: checkpoints made by compressed-tensors' own compressors (its calculate_qparams and
  ModelCompressor, as llm-compressor calls them) and by `archkit quantize`, loaded by transformers with the
  compressed-tensors package, which dequantizes them: every dense weight equal bit for bit, logits within the parity
  tolerance, greedy tokens equal.
- GPTQ and AWQ: transformers loads these only through GPTQModel / AutoAWQ kernels, which do not install into the test
  environment (GPTQModel pulls a CUDA build of torch; AutoAWQ needs datasets and transformers 4). So full models are
  checked against the formats' published description: the test packs known integers with the writers' own loops
  (AutoGPTQ's pack loop, AutoAWQ's from_linear order map), and transformers runs the dense weights those integers
  mean. Where GPTQModel or AutoAWQ is importable (a tools venv, or PYTHONPATH), their packers and dequantizers are the
  oracle layer by layer too.
- FP8 (transformers' "fp8" method): its loader needs a GPU, so the dense reference is computed with torch's own
  float8_e4m3fn, and the block dequantization is compared with compressed-tensors' block strategy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import core
import hfmodels as hf
from conftest import needs_torch
from core.checkpoint import Checkpoint, read_tensor, to_float32
from core.quant import QuantizedTensor, dequant
from core.quant.quantize import quantize

pytestmark = needs_torch
HAVE_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="compressed-tensors (the oracle) is not installed")
TOL = 1e-4  # = test_parity.TOL: the weights are equal, so only float32 summation order differs
SIZES = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256, tie=False)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def model_of(family: str, dtype: str = "float32", seed: int = 0, **kw):
    """A random transformers model of `family` (hfmodels' wide init), in `dtype`."""
    import torch
    import transformers

    config = hf.hf_config(family, **{**SIZES, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, hf.FAMILIES[family][1])(config).eval()
    return model.to(getattr(torch, dtype))


def ct_reference(path: Path, dequantize: bool = True):
    """transformers + compressed-tensors' model of `path` in float32 (dequantize: at load, else at first forward)."""
    import torch
    import transformers
    from transformers import CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                   output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_parity(path: Path, ref, n: int = 8, exact_weights: bool = True):
    """archkit on `path` against the dense transformers model `ref`: weights, logits, greedy tokens."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model = core.load(path, device="cpu", quiet=True)
    want = hf.hf_greedy(ref, PROMPT, n)  # first: transformers' default route decompresses at the first forward
    if exact_weights:
        with torch.no_grad():
            theirs = {k: v.float().numpy() for k, v in ref.state_dict().items()}
        quantized = [q for q in Checkpoint(path).tensors.values() if isinstance(q, QuantizedTensor)]
        assert quantized
        for q in quantized:
            ours = to_float32(read_tensor(q), q.dtype)
            dense = theirs[q.name]
            if isinstance(ref.get_submodule(q.name.removesuffix(".weight")), Conv1D):
                dense = dense.T  # GPT-2's Conv1D holds [in, out]; a quantized weight is [out, in]
            assert np.array_equal(ours, dense), f"{q.name}: max diff {np.abs(ours - dense).max()}"
    ids = PROMPT + want
    err = hf.rel_err(model.logits(ids), hf.hf_logits(ref, ids))
    assert err < TOL, f"logits rel err {err:.3g}"
    assert model.generate(PROMPT, max_new_tokens=n, stop_at_eos=False) == want
    return model


# -- compressed-tensors' own compressors ----------------------------------------------------------------------------

def _observe(w, args):
    """min and max of each block of weights one scale covers, shaped like compressed-tensors' scale."""
    n, k = w.shape
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        g = w.unflatten(1, (k // args.group_size, args.group_size))
        return g.amin(-1), g.amax(-1)
    br, bc = args.block_structure
    b = w.reshape(n // br, br, k // bc, bc)
    return b.amin((1, 3)), b.amax((1, 3))


def ct_checkpoint(path: Path, family: str, fmt: str, dtype: str = "float32", **weights) -> Path:
    """A `family` model quantized by compressed-tensors itself: min-max scales from its calculate_qparams, packed
    by its ModelCompressor in format `fmt`, saved with its update_config (llm-compressor's save path)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = model_of(family, dtype)
    args = QuantizationArgs(**weights)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    with torch.no_grad():
        for _, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is None:
                continue
            scale, zero = calculate_qparams(*_observe(m.weight.float(), args), args)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(zero.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


CT_CASES = {
    "int4-group-sym": ("pack-quantized", "float32", dict(num_bits=4, strategy="group", group_size=32)),
    "int4-group-asym": ("pack-quantized", "float32", dict(num_bits=4, strategy="group", group_size=16,
                                                          symmetric=False)),
    "int4-channel-sym-bf16": ("pack-quantized", "bfloat16", dict(num_bits=4, strategy="channel")),
    "int8-channel-asym": ("pack-quantized", "float32", dict(num_bits=8, strategy="channel", symmetric=False)),
    "int8-tensor-asym-f16": ("pack-quantized", "float16", dict(num_bits=8, strategy="tensor", symmetric=False)),
    "int8-naive-group": ("naive-quantized", "float32", dict(num_bits=8, strategy="group", group_size=32)),
    "fp8-channel": ("float-quantized", "float32", dict(num_bits=8, type="float", strategy="channel")),
    "fp8-block-bf16": ("float-quantized", "bfloat16", dict(num_bits=8, type="float", strategy="block",
                                                           block_structure=[32, 32])),
    "fp8-tensor": ("float-quantized", "float32", dict(num_bits=8, type="float", strategy="tensor")),
}


@needs_ct
@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_checkpoints(tmp_path, case):
    fmt, dtype, weights = CT_CASES[case]
    path = ct_checkpoint(tmp_path / case, "llama", fmt, dtype, **weights)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and qc["quant_method"] == "compressed-tensors"
    model = assert_parity(path, ct_reference(path))
    ckpt = Checkpoint(path)
    assert ckpt.quantization.method == "compressed-tensors" and ckpt.quantization.schemes[0][1] == 14
    assert "lm_head" in model.weights.globals  # ignored: loaded plain


@needs_ct
def test_ct_decompress_equals_ours_per_tensor(tmp_path):
    """The dequantized weight of one module equals compressed-tensors' decompress() of the same state dict (the
    load path transformers takes), for packed asymmetric int4 with bf16 scales."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    path = ct_checkpoint(tmp_path / "ck", "llama", "pack-quantized", "bfloat16", num_bits=4, strategy="group",
                         group_size=16, symmetric=False)
    sd = load_file(str(path / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj"
    local = {k.removeprefix(p + "."): v for k, v in sd.items() if k.startswith(p + ".")}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, strategy="group",
                                                                            group_size=16, symmetric=False))
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").decompress(local, scheme)["weight"]
    q = Checkpoint(path).tensors[p + ".weight"]
    assert theirs.dtype == torch.bfloat16 and q.dtype == "BF16"
    assert np.array_equal(read_tensor(q), theirs.view(torch.int16).numpy().view(np.uint16))


# -- what `archkit quantize` writes ---------------------------------------------------------------------------------

@needs_ct
@pytest.mark.parametrize("scheme, group, asym", [("w4a16", 32, False), ("w4a16", 16, True), ("w8a16", None, False),
                                                 ("fp8", None, False)])
def test_archkit_quantize_loads_in_transformers(tmp_path, scheme, group, asym):
    src = tmp_path / "src"
    model_of("llama").save_pretrained(src)
    dst = tmp_path / "dst"
    out = quantize(src, dst, scheme, group, not asym)
    assert out["quantized"] == 14 and out["ignore"] == ["lm_head"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(json.loads((dst / "config.json").read_text())["quantization_config"])
    assert_parity(dst, ct_reference(dst))
    if not asym:
        # transformers' default route (decompress at the first forward) too. Its asymmetric pack-quantized load fails
        # in transformers 5.25 + compressed-tensors 0.20.1: the zero points are expected unpacked ("MISMATCH").
        assert_parity(dst, ct_reference(dst, dequantize=False))


@needs_ct
@pytest.mark.parametrize("family", ["phi3", "starcoder2", "qwen3"])
def test_archkit_quantize_other_families(tmp_path, family):
    """Fused q/k/v and gate/up (phi3), biases and an out-of-tree plugin (starcoder2), q/k norms (qwen3): the family's
    own weight rules find what to quantize, and loading needs nothing from the plugin."""
    if family not in core.architectures():
        pytest.fail(f"family {family!r} is not registered (pip install ./tests/plugins/archkit_{family})")
    src = tmp_path / "src"
    model_of(family).save_pretrained(src)
    out = quantize(src, tmp_path / "dst", "w4a16", 32, False)
    assert out["quantized"] >= 4
    assert_parity(tmp_path / "dst", ct_reference(tmp_path / "dst"))


# -- GPTQ and AWQ by their published layouts --------------------------------------------------------------------------

def rtn_asym(w: np.ndarray, bits: int, groups: np.ndarray, n_groups: int):
    """Integers, fp16 scales and zero points (in [1, 2**bits - 1]) of W^T [K, N], input row k in group groups[k]."""
    k, n = w.shape
    s = np.zeros((n_groups, n), np.float16)
    z = np.zeros((n_groups, n), np.int64)
    for g in range(n_groups):
        rows = w[groups == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        s[g] = (hi - lo) / (2 ** bits - 2)
        z[g] = np.clip(np.rint(-lo / s[g].astype(np.float32)) + 1, 1, 2 ** bits - 1)  # never 0: v1's corner case
    q = np.clip(np.rint(w / s[groups].astype(np.float32)) + z[groups], 0, 2 ** bits - 1).astype(np.int64)
    return q, s, z


def autogptq_pack(q: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """AutoGPTQ's pack loop: 32 / bits values per uint32, value j of a run at bits [bits * j, bits * (j + 1))."""
    per = 32 // bits
    q = np.moveaxis(q, axis, 0).astype(np.uint64)
    out = np.zeros((math.ceil(q.shape[0] / per),) + q.shape[1:], np.uint64)
    for i in range(q.shape[0]):
        out[i // per] |= q[i] << np.uint64(bits * (i % per))
    return np.moveaxis(out.astype(np.uint32).view(np.int32), 0, axis)


def awq_pack(q: np.ndarray) -> np.ndarray:
    """AutoAWQ's from_linear loop over each row: qweight[:, col] |= q[:, col * 8 + order_map[i]] << (4 * i)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((q.shape[0], q.shape[1] // 8), np.uint64)
    for col in range(q.shape[1] // 8):
        for i in range(8):
            out[:, col] |= q[:, col * 8 + order_map[i]].astype(np.uint64) << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def quantized_checkpoint(path: Path, family: str, qc: dict, write, **kw) -> tuple[Path, object]:
    """Save a random `family` model, replace each Linear weight with write(name, W^T [in, out] float32) → (tensors,
    dense W^T), set quantization_config; return the path and the transformers model holding the dense weights."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    model_of(family, **kw).save_pretrained(path)
    # the reference is loaded in float32 (a model cast to float16 and back would keep float16 rope tables)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    sd = load_file(str(path / "model.safetensors"))
    conv1d = family == "gpt2"  # Conv1D stores [in, out]; GPTQ quantizes it as the Linear [out, in] it computes
    dense = {}
    for name in list(sd):
        if not name.endswith(".weight") or sd[name].ndim != 2 or "embed" in name or "wte" in name or "wpe" in name \
                or name.startswith("lm_head"):
            continue
        wt = sd.pop(name).float().numpy()
        parts, back = write(name.removesuffix(".weight"), wt if conv1d else wt.T)
        sd.update({k: v.contiguous() if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                   for k, v in parts.items()})
        dense[name] = torch.from_numpy(np.ascontiguousarray(back if conv1d else back.T))
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with torch.no_grad():
        for name, w in dense.items():
            model.get_parameter(name).copy_(w)
    return path, model


def gptq_writer(bits: int, group: int, desc_act: bool, v1: bool, seed: int = 0):
    """A write() for quantized_checkpoint: GPTQ parts by the AutoGPTQ layout, and the dense W^T they mean."""
    rng = np.random.default_rng(seed)

    def write(prefix, wt):
        k, n = wt.shape
        g = k if group == -1 else group
        order = rng.permutation(k) if desc_act else np.arange(k)
        g_idx = np.empty(k, np.int32)
        g_idx[order] = np.arange(k) // g  # desc_act: columns quantized in activation order, grouped in that order
        q, s, z = rtn_asym(wt, bits, g_idx, k // g)
        qzeros = autogptq_pack(z - 1 if v1 else z, bits, axis=1)  # v1: zero points minus one, field by field
        back = (s[g_idx] * (q - z[g_idx]).astype(np.float16)).astype(np.float32)  # in fp16, as GPTQ kernels do
        return {f"{prefix}.qweight": autogptq_pack(q, bits, axis=0), f"{prefix}.qzeros": qzeros,
                f"{prefix}.scales": s, f"{prefix}.g_idx": g_idx}, back
    return write


@pytest.mark.parametrize("family, bits, group, desc_act, v1", [
    ("llama", 4, 32, False, True), ("llama", 4, 16, True, True), ("llama", 8, -1, False, False),
    ("llama", 2, 32, False, True), ("gpt2", 4, 32, True, False)])
def test_gptq_by_its_published_layout(tmp_path, family, bits, group, desc_act, v1):
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": False,
          "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    path, ref = quantized_checkpoint(tmp_path / "ck", family, qc, gptq_writer(bits, group, desc_act, v1),
                                     dtype="float16")
    assert_parity(path, ref)


def test_awq_by_its_published_layout(tmp_path):
    def write(prefix, wt):
        k, n = wt.shape
        groups = np.arange(k) // 32
        q, s, z = rtn_asym(wt, 4, groups, k // 32)
        back = (s[groups] * (q - z[groups]).astype(np.float16)).astype(np.float32)
        return {f"{prefix}.qweight": awq_pack(q), f"{prefix}.qzeros": awq_pack(z), f"{prefix}.scales": s}, back

    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    path, ref = quantized_checkpoint(tmp_path / "ck", "llama", qc, write, dtype="float16")
    assert_parity(path, ref)


def _stub_package(monkeypatch, name: str) -> bool:
    """Make package `name` importable without running its __init__ (AutoAWQ's imports datasets and transformers
    4.x model classes; GPTQModel's is fine), or say it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    if name == "awq":
        stub = types.ModuleType(name)
        stub.__path__ = list(spec.submodule_search_locations)
        monkeypatch.setitem(sys.modules, name, stub)
    return True


@pytest.mark.parametrize("bits, group, desc_act", [(4, 32, True), (8, -1, False), (2, 16, False)])
def test_gptq_against_gptqmodel(monkeypatch, bits, group, desc_act):
    """GPTQModel's own save path (pack_original into its CPU TorchLinear, then convert_gptq_v2_to_v1_format_module as
    model.save does) and its load path (convert_gptq_v1_to_v2_format_module, dequantize_weight) against ours."""
    if not _stub_package(monkeypatch, "gptqmodel"):
        pytest.skip("gptqmodel is not installed (its wheel requires a CUDA build of torch); see the module docstring")
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    k, n = 128, 64
    linear = torch.nn.Linear(k, n, bias=False)
    g = k if group == -1 else group
    g_idx = (torch.randperm(k, generator=torch.Generator().manual_seed(0)) if desc_act else torch.arange(k)) // g
    q, s, z = rtn_asym(linear.weight.detach().T.numpy(), bits, g_idx.numpy(), k // g)
    mod = TorchLinear(bits=bits, group_size=group, sym=False, desc_act=desc_act, in_features=k, out_features=n,
                      bias=False, pack_dtype=torch.int32)
    mod.pack_original(linear, torch.from_numpy(s.T.astype(np.float32)), torch.from_numpy(z.T.astype(np.float32)),
                      g_idx.int())
    mod.qzero_format(format=2)  # packed in memory with the true zero points; saving writes v1
    convert_gptq_v2_to_v1_format_module(mod, QuantizeConfig(bits=bits))
    stored = {x: getattr(mod, x).detach().clone().numpy() for x in ("qweight", "qzeros", "scales", "g_idx")}
    ours = dequant.gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"], bits, True, "F16")
    convert_gptq_v1_to_v2_format_module(mod, bits=bits, pack_dtype=torch.int32)
    mod.post_init()
    assert np.array_equal(ours, mod.dequantize_weight().T.numpy())
    # and the packed integers mean the weight: within half a step of it (GPTQModel rounds the weight itself)
    step = s[g_idx.numpy()].T.astype(np.float32)
    assert (np.abs(ours.astype(np.float32) - linear.weight.detach().numpy()) <= 0.5 * step + 1e-3).all()


def test_awq_against_autoawq(monkeypatch):
    """AutoAWQ's own packer (WQLinear_GEMM.from_linear) and dequantizer (dequantize_gemm) against ours, one layer."""
    if not _stub_package(monkeypatch, "awq"):
        pytest.skip("autoawq is not installed (deprecated; needs datasets and transformers 4); see the docstring")
    import torch
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    k, n, g = 128, 64, 32
    linear = torch.nn.Linear(k, n, bias=False)
    q, s, z = rtn_asym(linear.weight.detach().T.numpy(), 4, np.arange(k) // g, k // g)
    wq = WQLinear_GEMM.from_linear(linear, 4, g, scales=torch.from_numpy(s), zeros=torch.from_numpy(z).int())
    stored = {x: getattr(wq, x).numpy() for x in ("qweight", "qzeros", "scales")}
    ours = dequant.awq(stored["qweight"], stored["qzeros"], stored["scales"], g, "F16")
    theirs = dequantize_gemm(wq.qweight, wq.qzeros, wq.scales, 4, g).T.numpy()
    assert np.array_equal(ours, theirs)


# -- FP8 (transformers' "fp8" method) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block, scale_dtype", [((32, 32), "float32"), ((128, 128), "bfloat16"), (None, "float32")])
def test_fp8_checkpoint(tmp_path, block, scale_dtype):
    """Block-wise (DeepSeek-V3 / Qwen3-FP8 layout; 128 x 128 over 64-wide weights is one cut-short block) and
    per-channel FP8: the dense reference is torch's float8_e4m3fn times the expanded scale."""
    import torch

    def write(prefix, wt):
        w = torch.from_numpy(np.ascontiguousarray(wt.T))  # [out, in]
        n, k = w.shape
        br, bc = block or (1, k)
        nb, kb = -(-n // br), -(-k // bc)
        amax = torch.nn.functional.pad(w.abs(), (0, kb * bc - k, 0, nb * br - n)).reshape(nb, br, kb, bc).amax((1, 3))
        s = (amax / 448).to(getattr(torch, scale_dtype))
        full = s.float().repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]
        codes = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        back = (codes.float() * full).to(getattr(torch, scale_dtype)).float()
        parts = {f"{prefix}.weight": codes, f"{prefix}.weight_scale_inv": s if block else s.reshape(n, 1)}
        return parts, back.T.numpy()

    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
          "weight_block_size": list(block) if block else None}
    path, ref = quantized_checkpoint(tmp_path / "ck", "llama", qc, write)
    assert_parity(path, ref)


@needs_ct
def test_fp8_block_dequant_equals_compressed_tensors():
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(96, 160), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaNs
    scale = rng.random((2, 2), dtype=np.float32)  # 64 x 128 blocks: the last of each dimension cut short
    ours = dequant.fp8(codes, "F8_E4M3", scale, "F32", (64, 128))
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[64, 128])
    theirs = dequantize(torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scale), None, args)
    assert np.array_equal(ours, theirs.numpy())
