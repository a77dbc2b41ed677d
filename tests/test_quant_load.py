"""How quantized checkpoints reach the backends (numpy only): what `convert` receives, dtypes, shards, slices, the CLI.

The numpy backend receives dense bits in the scales' dtype, through Plan.load's convert(bits, stored, role). The CUDA
backend asks for the projections as stored instead (quantized_nbytes / convert_quantized): tests/test_quant_layout.py
checks that hand-over and its device layout, tests/test_cuda_quant.py the kernels on a GPU.
"""

from __future__ import annotations

import json

import numpy as np

import core
from core.checkpoint import Checkpoint, read_tensor, read_tensor_slice, to_float32
from core.cli import main as cli_main
from core.config import ModelConfig
from core.quant import QuantizedTensor
from core.quant.quantize import quantize
from core.registry import default_registry
from core.weights import plan
from test_quant_errors import Q, gptq
from tinyckpt import edit_json, write_checkpoint


def quantized(tmp, scheme="w4a16", group=16, **kw):
    src = write_checkpoint(tmp / "plain", **kw)
    quantize(src, tmp / "q", scheme, group)
    return src, tmp / "q"


def test_backends_receive_dense_bits_in_the_scale_dtype(tmp_path):
    _, path = quantized(tmp_path, dtype=np.float16)  # an fp16 source: fp16 scales, fp16 dense weights
    ckpt = Checkpoint(path)
    spec = default_registry()["llama"].spec
    p = plan(spec, ModelConfig.from_hf(spec, ckpt.config), ckpt)
    seen = {}
    for role, layer, (bits, stored) in p.load(lambda bits, stored, role: (bits, stored)):
        seen[role, layer] = (bits, stored)
    bits, stored = seen["q.weight", 0]
    assert stored == "F16" and bits.dtype == np.float16 and bits.shape == (16, 16)
    assert np.array_equal(bits, read_tensor(ckpt.tensors[Q + ".weight"]))
    assert seen["attn_norm.weight", 0][1] == "F16"  # plain tensors as before


def test_numpy_backend_dtypes_and_closeness(tmp_path):
    src, path = quantized(tmp_path, scheme="w8a16", group=None)
    ids = [1, 2, 3, 4, 5, 6]
    dense = core.load(src, device="cpu", quiet=True).logits(ids)
    for dtype in ("float32", "float16", "bfloat16"):
        got = core.load(path, device="cpu", quiet=True, dtype=dtype).logits(ids)
        assert np.abs(got - dense).max() < 0.05 * np.abs(dense).max(), dtype  # int8 per channel: close


def test_sharded_source_keeps_its_shards(tmp_path):
    src = write_checkpoint(tmp_path / "plain", shards=3)
    out = quantize(src, tmp_path / "q", "fp8")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"][Q + ".weight_scale"] == index["weight_map"][Q + ".weight"]
    assert index["metadata"]["total_size"] == out["bytes_after"]
    one = quantize(write_checkpoint(tmp_path / "single"), tmp_path / "q1", "fp8")
    assert one["quantized"] == out["quantized"] == 14
    a = core.load(tmp_path / "q", device="cpu", quiet=True).logits([1, 2, 3])
    b = core.load(tmp_path / "q1", device="cpu", quiet=True).logits([1, 2, 3])
    assert np.array_equal(a, b)  # same seed, same weights: sharding changes nothing


def test_slices_of_a_quantized_weight(tmp_path):
    _, path = quantized(tmp_path)
    q = Checkpoint(path).tensors["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.shape == (16, 32)
    whole = read_tensor(q)
    assert np.array_equal(read_tensor_slice(q, 1, 8, 24), whole[:, 8:24])
    assert np.array_equal(read_tensor_slice(q, 0, 3, 5), whole[3:5])


def test_gptq_quantize_config_json_fallback(tmp_path):
    """Older AutoGPTQ uploads carry quantize_config.json only (no quant_method in it)."""
    p = gptq(tmp_path)
    qc = {}
    edit_json(p / "config.json", lambda d: qc.update(d.pop("quantization_config")))
    qc.pop("quant_method")
    (p / "quantize_config.json").write_text(json.dumps(qc))
    ckpt = Checkpoint(p)
    assert ckpt.quantization.method == "gptq"
    assert np.isfinite(core.load(p, device="cpu", quiet=True).logits([1, 2])).all()


def test_inspect_shows_scheme_bits_group_and_bytes(tmp_path, capsys):
    _, path = quantized(tmp_path, group=16)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "quantization compressed-tensors: 14 quantized weights" in out
    assert "pack-quantized: int4 symmetric, group 16 (14 weights)" in out and "bits each" in out


def test_quantize_command(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "plain")
    assert cli_main(["quantize", str(src), str(tmp_path / "q"), "--scheme", "w4a16", "--group-size", "16",
                     "--asym"]) == 0
    assert "14 weights as w4a16 (pack-quantized)" in capsys.readouterr().out
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], w["num_bits"], w["group_size"], w["symmetric"], qc["ignore"]) == \
        ("pack-quantized", 4, 16, False, ["lm_head"])
    assert not (tmp_path / "q.tmp").exists()
    ref = to_float32(read_tensor(Checkpoint(src).tensors[Q + ".weight"]), "F32")
    got = to_float32(read_tensor(Checkpoint(tmp_path / "q").tensors[Q + ".weight"]), "F32")
    assert np.abs(got - ref).max() <= 2 * np.abs(ref).max() / 15 * 0.51  # half a step (range / 15) of the widest group


def test_bench_quant_option_names_its_device(capsys):
    """`archkit bench --quant` measures the CUDA kernels: on the CPU (or with --serve) one line says so, exit 1; on a
    machine without a usable GPU, one line says why."""
    from core.load import cuda_available

    assert cli_main(["bench", "--quant", "w4a16", "--model", "qwen3-8b"]) == 1
    assert "--device cuda" in capsys.readouterr().err
    if not cuda_available()[0]:
        assert cli_main(["bench", "--quant", "fp8", "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert "not usable" in err and len(err.strip().splitlines()) == 1
