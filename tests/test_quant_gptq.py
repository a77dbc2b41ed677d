"""GPTQ calibration (core/quant/gptq.py, `archkit quantize --calibrate`).

- With an identity Hessian no error is spread (H^-1 is diagonal), so GPTQ must give exactly round-to-nearest's
  codes, scales and zero points (quantize.rtn_int, written independently).
- On inputs with correlated features, the layer's output error ||(W - W_q) X^T|| is smaller than round-to-nearest's:
  what GPTQ minimises.
- The shrink-factor search (gptq.CLIP) never leaves a row with a larger output error than plain GPTQ, and cutting
  its stacked run into slabs of rows changes nothing. Act-order (gptq.ORDERS) with a diagonal Hessian is exactly
  round-to-nearest in the stored column order, and trying it never leaves a row worse than the stored order alone.
- End to end: the demo models, w4a16 with groups of 128, calibrated on stdlib source they trained on (never the
  held-out modules), against the fp32 model's perplexity on the whole held-out modules (tests/test_quant_quality.py),
  each row keeping the best of 7 shrink factors x 2 column orders: symmetric (the default) qwen3 +4.2% (the issue's
  bar, 5%, met; round-to-nearest +11.6%), llama +5.6% (not met; round-to-nearest +13.2%); asymmetric (`--asym`)
  qwen3 +4.8%, llama +4.8% (met); pinned here so a regression fails. The written checkpoint is the same
  compressed-tensors format as round-to-nearest's; the CLI takes the text from a file.
- fp8 (gptq_fp8: the E4M3 grid, one scale per row): the same identity and output-error checks against
  quantize.rtn_fp8, and the demo qwen3 within the issue's 1% (+0.90%; round-to-nearest +1.04%; llama +0.22% against
  +0.44%, not pinned here: its round-to-nearest already meets the bar, tests/test_quant_quality.py).
"""

from __future__ import annotations

import inspect
import importlib
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from core.checkpoint import to_float32
from core.demo import demo_checkpoint
from core.errors import QuantizationError
import core.quant.gptq as gptq_mod
from core.quant.gptq import gptq_fp8, gptq_int
from core.quant.dequant import int_weight
from core.quant.pack import fp8_to_float32
from core.quant.quantize import quantize, rtn_fp8, rtn_int

CALIBRATION_MODULES = ("json.decoder", "csv", "string", "heapq", "bisect", "queue", "calendar", "argparse", "logging",
                       "pathlib", "typing", "collections")  # trained on by tools/train_demo.py; none is held out


def calibration_text() -> str:
    return "".join(inspect.getsource(importlib.import_module(m)) for m in CALIBRATION_MODULES)


def dequant(q, s_bits, z, group, dtype):
    s = to_float32(s_bits, dtype)
    g = q.shape[1] if group == -1 else group
    qq = q.reshape(q.shape[0], -1, g).astype(np.float64) - (0 if z is None else z[..., None])
    return (qq * s[..., None]).reshape(q.shape)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), groups=st.integers(1, 4), g=st.sampled_from([8, 16, 32]), bits=st.sampled_from([4, 8]),
       symmetric=st.booleans(), dtype=st.sampled_from(["F32", "F16", "BF16"]), seed=st.integers(0, 2**32 - 1))
def test_identity_hessian_is_round_to_nearest(n, groups, g, bits, symmetric, dtype, seed):
    r = np.random.default_rng(seed)
    k = groups * g
    w = (r.standard_normal((n, k)) * r.uniform(0.01, 3)).astype(np.float32)
    want = rtn_int(w, bits, g, symmetric, dtype)
    got = gptq_int(w, np.eye(k), bits, g, symmetric, dtype, clip=(1.0,))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if symmetric:
        assert got[2] is None and want[2] is None
    else:
        np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, -1, True), (4, 32, False), (8, -1, True)])
def test_output_error_is_below_round_to_nearest(seed, bits, group, symmetric):
    r = np.random.default_rng(seed)
    n, k, rows = 48, 128, 2000
    mix = r.standard_normal((k, k)) / np.sqrt(k) + np.eye(k) * 0.2  # correlated input features
    x = r.standard_normal((rows, k)) @ mix * r.uniform(0.2, 3, k)
    w = r.standard_normal((n, k)).astype(np.float32)
    err = {}
    for name, (q, s, z) in {"rtn": rtn_int(w, bits, group, symmetric, "F32"),
                            "gptq": gptq_int(w, x.T @ x, bits, group, symmetric, "F32")}.items():
        err[name] = np.linalg.norm((w - dequant(q, s, z, group, "F32")) @ x.T)
    assert err["gptq"] < 0.9 * err["rtn"], err


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 24), groups=st.integers(1, 4), g=st.sampled_from([8, 16, 32]), bits=st.sampled_from([4, 8]),
       symmetric=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_act_order_with_a_diagonal_hessian_is_round_to_nearest(n, groups, g, bits, symmetric, seed):
    """A diagonal Hessian spreads no error, in any column order, so act-order alone (columns by descending, distinct
    Hessian diagonal: a real permutation) must give round-to-nearest's codes, scales and zero points in the stored
    column order: this checks the permutation's bookkeeping and that the static groups are the stored ones."""
    r = np.random.default_rng(seed)
    k = groups * g
    w = (r.standard_normal((n, k)) * r.uniform(0.01, 3)).astype(np.float32)
    xtx = np.diag(r.permutation(k) + 1.0)
    want = rtn_int(w, bits, g, symmetric, "F32")
    got = gptq_int(w, xtx, bits, g, symmetric, "F32", clip=(1.0,), orders=(True,))
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_order_search_never_leaves_a_row_worse(seed):
    """Trying act-order as well as the stored order (gptq.ORDERS) keeps, per row, the smaller output error
    (w - deq) X^T X (w - deq)^T: never larger than the stored order alone, and smaller in total on inputs whose
    features differ in scale and correlate (where act-order helps some rows)."""
    r = np.random.default_rng(seed)
    n, k, rows, g = 64, 128, 2000, 32
    mix = r.standard_normal((k, k)) / np.sqrt(k) + np.eye(k) * 0.2
    x = r.standard_normal((rows, k)) @ mix * r.uniform(0.05, 5, k)
    xtx = x.T @ x
    w = r.standard_normal((n, k)).astype(np.float32)

    def row_err(q, s, z):
        d = w - dequant(q, s, z, g, "F32")
        return ((d @ xtx) * d).sum(1)

    stored = row_err(*gptq_int(w, xtx, 4, g, False, "F32", orders=(False,)))
    both = row_err(*gptq_int(w, xtx, 4, g, False, "F32"))
    assert (both <= stored * (1 + 1e-9)).all()
    assert both.sum() < stored.sum()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 24), k=st.sampled_from([8, 40, 128]), dtype=st.sampled_from(["F32", "F16", "BF16"]),
       seed=st.integers(0, 2**32 - 1))
def test_identity_hessian_is_round_to_nearest_fp8(n, k, dtype, seed):
    r = np.random.default_rng(seed)
    w = (r.standard_normal((n, k)) * r.uniform(0.01, 3)).astype(np.float32)
    want, got = rtn_fp8(w, dtype), gptq_fp8(w, np.eye(k), dtype)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(6))
def test_output_error_is_below_round_to_nearest_fp8(seed):
    r = np.random.default_rng(seed)
    n, k, rows = 48, 128, 2000
    mix = r.standard_normal((k, k)) / np.sqrt(k) + np.eye(k) * 0.2
    x = r.standard_normal((rows, k)) @ mix * r.uniform(0.2, 3, k)
    w = r.standard_normal((n, k)).astype(np.float32)
    err = {}
    for name, (c, s) in {"rtn": rtn_fp8(w, "F32"), "gptq": gptq_fp8(w, x.T @ x, "F32")}.items():
        err[name] = np.linalg.norm((w - fp8_to_float32(c, "F8_E4M3") * to_float32(s, "F32")) @ x.T)
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_calibrated_demo_fp8_perplexity(tmp_path):
    """qwen3's demo, fp8 per channel: round-to-nearest is +1.04% (the issue's bar is 1%), GPTQ +0.90%."""
    from test_quant_quality import perplexity

    base = perplexity(core.load(demo_checkpoint("qwen3"), device="cpu", quiet=True))
    out = quantize(demo_checkpoint("qwen3"), tmp_path / "q", "fp8", calibration=calibration_text())
    assert out["calibrated"] == out["quantized"] == 42
    ratio = perplexity(core.load(tmp_path / "q", device="cpu", quiet=True)) / base
    print(f"qwen3 fp8 GPTQ: perplexity x{ratio:.4f}")
    assert ratio < 1.01, f"perplexity {ratio:.4f}x the fp32 model's"


def test_dead_inputs_and_bad_arguments():
    """An input that is always zero gets a zero weight (it cannot matter), fp8's too; a too-short text is refused."""
    r = np.random.default_rng(0)
    x = r.standard_normal((500, 32))
    x[:, 5] = 0
    q, s, _ = gptq_int(r.standard_normal((4, 32)).astype(np.float32), x.T @ x, 4, 16, True, "F32")
    assert (q[:, 5] == 0).all()
    c, _ = gptq_fp8(r.standard_normal((4, 32)).astype(np.float32), x.T @ x, "F32")
    assert (fp8_to_float32(c[:, 5], "F8_E4M3") == 0).all()
    with pytest.raises(QuantizationError, match="calibration-tokens"):
        quantize(demo_checkpoint("llama"), "/nonexistent/x", "w4a16", calibration="some text", calibration_tokens=1)


# measured (docstring): symmetric qwen3 +4.2%, llama +5.6% (pinned at 7%: the bar is not met there); asymmetric
# +4.8% both (the bar, 5%, is the bound)
@pytest.mark.parametrize("family, symmetric, bound", [("qwen3", True, 1.05), ("llama", True, 1.07),
                                                      ("qwen3", False, 1.05), ("llama", False, 1.05)])
def test_calibrated_demo_w4a16_perplexity(tmp_path, family, symmetric, bound):
    from test_quant_quality import perplexity

    base = perplexity(core.load(demo_checkpoint(family), device="cpu", quiet=True))
    out = quantize(demo_checkpoint(family), tmp_path / "q", "w4a16", 128, symmetric=symmetric,
                   calibration=calibration_text())
    assert out["calibrated"] == out["quantized"] == 42
    ratio = perplexity(core.load(tmp_path / "q", device="cpu", quiet=True)) / base
    print(f"{family} w4a16 g128 {'sym' if symmetric else 'asym'} GPTQ: perplexity x{ratio:.4f}")
    assert ratio < bound, f"perplexity {ratio:.4f}x the fp32 model's"


def test_cli_calibrate(tmp_path, capsys):
    from core.cli import main as cli_main

    text = tmp_path / "calib.txt"
    text.write_text(calibration_text()[:40000], encoding="utf-8")
    assert cli_main(["quantize", str(demo_checkpoint("llama")), str(tmp_path / "q"), "--scheme", "w4a16",
                     "--calibrate", str(text), "--calibration-tokens", "2048"]) == 0
    assert "42 by GPTQ" in capsys.readouterr().out
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert math.isfinite(core.load(tmp_path / "q", device="cpu", quiet=True).logits([1, 2, 3]).sum())
    plain = tmp_path / "plain"
    assert cli_main(["quantize", str(demo_checkpoint("llama")), str(plain), "--scheme", "w4a16", "--calibrate",
                     str(text), "--calibration-tokens", "2048", "--no-clip-search"]) == 0
    assert "42 by GPTQ" in capsys.readouterr().out
    # the default searched the shrink factors: some rows kept one other than 1, so some codes differ from plain GPTQ's
    from safetensors.numpy import load_file
    a, b = load_file(tmp_path / "q" / "model.safetensors"), load_file(plain / "model.safetensors")
    assert set(a) == set(b) and any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))
    text.write_bytes(b"\xff\xfe bad")
    assert cli_main(["quantize", str(demo_checkpoint("llama")), str(tmp_path / "q2"), "--scheme", "w4a16",
                     "--calibrate", str(text)]) == 1
    assert "cannot read the calibration text" in capsys.readouterr().err



@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), k=st.sampled_from([16, 32, 64]), group=st.sampled_from([16, -1]),
       symmetric=st.booleans(), slab=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_clip_search_never_raises_a_rows_output_error(monkeypatch, n, k, group, symmetric, slab, seed):
    """Each row keeps the shrink factor with the smallest (w - deq) X^T X (w - deq)^T, so no row ends worse than
    plain GPTQ (clip=(1.0,)) there; rows are independent, so cutting the stacked run into slabs changes nothing.
    deq is the weight every reader computes (dequant.int_weight: (q - z) s rounded to the scale dtype), which the
    search scores; measured on the unrounded product instead, a row may come out worse by that rounding (hypothesis
    found n=15, k=64, per row, asymmetric, seed 231: +0.03%)."""
    r = np.random.default_rng(seed)
    w = (r.standard_t(3, size=(n, k)) * r.uniform(0.01, 2)).astype(np.float32)  # heavy tails: outliers to clip
    x = r.standard_normal((4 * k, k)) @ (r.standard_normal((k, k)) / np.sqrt(k) + np.eye(k))
    xtx = x.T @ x
    g = k if group == -1 else group

    def row_err(res):
        q, s, z = res
        d = w - int_weight(q, s, "F16", z, (1, g))
        return np.einsum("nk,kl,nl->n", d, xtx, d)

    plain = row_err(gptq_int(w, xtx, 4, group, symmetric, "F16", clip=(1.0,)))
    searched = gptq_int(w, xtx, 4, group, symmetric, "F16")
    assert (row_err(searched) <= plain * (1 + 1e-9) + 1e-12).all()
    monkeypatch.setattr(gptq_mod, "ROWS", slab * len(gptq_mod.CLIP))
    again = gptq_int(w, xtx, 4, group, symmetric, "F16")
    for a, b in zip(searched, again):
        np.testing.assert_array_equal(a, b)
    assert searched[1].shape == (n, k // g)
