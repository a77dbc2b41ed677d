"""The bit-level codecs of core/quant/pack.py and the round-to-nearest of `archkit quantize` (numpy only, fast).

Hand-checked vectors pack a known integer matrix by each format's documented bit order and compare with words
written out by hand; hypothesis checks the round trips. FP8 decoding and encoding are compared with torch's own
float8 dtypes where torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import HAVE_TORCH
from core.quant import dequant
from core.quant.pack import (AWQ_ORDER, fp8_table, fp8_to_float32, float32_to_e4m3, gptq_to_v1_zeros, gptq_v1_zeros,
                             pack, round_to, unpack)
from core.quant.quantize import rtn_fp8, rtn_int


def words(*hexes) -> np.ndarray:
    """int32 words written as unsigned hex."""
    return np.array(hexes, dtype=np.uint32).view(np.int32)


# -- hand-checked vectors ---------------------------------------------------------------------------------------------

def test_gptq_qweight_packs_input_rows_low_nibble_first():
    # AutoGPTQ's pack loop: qweight[row] |= intweight[j] << (bits * (j - i)) for the 8 input rows i..i+7 of a word.
    q = np.array([[k + 8 * n for n in range(2)] for k in range(8)])  # W^T [K=8, N=2]: column 0 holds 0..7
    assert np.array_equal(pack(q, 4, axis=0), words(0x76543210, 0xFEDCBA98)[None])
    assert np.array_equal(unpack(words(0x76543210, 0xFEDCBA98)[None], 4, axis=0), q)


def test_gptq_8bit_and_2bit_word_order():
    assert np.array_equal(unpack(words(0x04030201)[:, None], 8, axis=0)[:, 0], [1, 2, 3, 4])
    # 2 bits: 16 values per word, value i at bits 2i: 0b...11_10_01_00 repeated
    assert np.array_equal(unpack(words(0xE4E4E4E4)[:, None], 2, axis=0)[:, 0], [0, 1, 2, 3] * 4)


def test_gptq_v1_zero_points_are_stored_minus_one():
    # Symmetric 4-bit GPTQ has every zero point 8; the v1 checkpoint format stores 7s (0x77777777).
    assert np.array_equal(unpack(gptq_v1_zeros(words(0x77777777)[None], 4), 4, axis=1), np.full((1, 8), 8))
    # A true zero point of 0 borrows from the field above when written; the word-wise correction gives it back.
    true = words(0x87654320)[None]  # fields (low first): 0, 2, 3, 4, 5, 6, 7, 8
    stored = gptq_to_v1_zeros(true, 4)
    assert stored.view(np.uint32)[0, 0] == 0x87654320 - 0x11111111
    assert np.array_equal(unpack(gptq_v1_zeros(stored, 4), 4, axis=1), [[0, 2, 3, 4, 5, 6, 7, 8]])
    assert gptq_v1_zeros(words(0x7F7F7F7F), 8).view(np.uint32)[0] == 0x80808080


def test_awq_gemm_word_order():
    # AutoAWQ's from_linear: slot i of a word takes column order_map[i] = [0, 2, 4, 6, 1, 3, 5, 7][i].
    cols = np.arange(1, 9)[None]  # columns 0..7 hold 1..8
    # slots low→high hold 1, 3, 5, 7, 2, 4, 6, 8, so the word reads 0x86427531
    assert np.array_equal(pack(cols, 4, axis=1, order=AWQ_ORDER), words(0x86427531)[None])
    assert np.array_equal(unpack(words(0x86427531)[None], 4, axis=1, order=AWQ_ORDER), cols)


def test_compressed_tensors_int4_offset_and_order():
    # pack_to_int32 stores q + 8 along each row, element i at bits 4i: -8..7 become words 0x76543210, 0xFEDCBA98.
    q = np.arange(-8, 8)[None]
    assert np.array_equal(dequant.ct_packed(words(0x76543210, 0xFEDCBA98)[None], 4, (1, 16)), q)
    assert np.array_equal(dequant.ct_packed(words(0x00000098)[None], 4, (1, 2)), [[0, 1]])  # a padded last word
    # zero points are packed down the columns: 8 rows of one group in one word
    assert np.array_equal(dequant.ct_packed_zero(words(0x76543210)[:, None], 4, 8)[:, 0], np.arange(-8, 0))


def test_fp8_codes_by_hand():
    e4m3 = {0x38: 1.0, 0x40: 2.0, 0x30: 0.5, 0x3C: 1.5, 0x7E: 448.0, 0x08: 2.0 ** -6, 0x01: 2.0 ** -9, 0x80: -0.0,
            0xB8: -1.0, 0xFE: -448.0}
    e5m2 = {0x3C: 1.0, 0x3E: 1.5, 0x7B: 57344.0, 0x04: 2.0 ** -14, 0x01: 2.0 ** -16, 0x7C: np.inf, 0xFC: -np.inf}
    for code, v in e4m3.items():
        assert fp8_to_float32(code, "F8_E4M3") == v and np.signbit(fp8_to_float32(code, "F8_E4M3")) == np.signbit(v)
    for code, v in e5m2.items():
        assert fp8_to_float32(code, "F8_E5M2") == v
    assert np.isnan(fp8_table("F8_E4M3")[[0x7F, 0xFF]]).all() and np.isnan(fp8_table("F8_E5M2")[[0x7D, 0x7F]]).all()
    assert np.isnan(fp8_table("F8_E4M3")).sum() == 2  # e4m3fn: no infinities, one NaN per sign
    # saturating, round-half-to-even encoding: 1.0625 lies halfway between 1.0 (0x38) and 1.125 (0x39)
    assert list(float32_to_e4m3(np.array([1.0625, 1.1875, 1e9, -1e9, 0.0, -0.0], np.float32))) == \
        [0x38, 0x3A, 0x7E, 0xFE, 0x00, 0x80]


def test_fp8_block_dequant_by_hand():
    # 3 x 3 codes of 1.0 in blocks of 2 x 2: four scales, the last block row and column cut short.
    w = np.full((3, 3), 0x38, np.uint8)
    s = np.array([[1, 2], [3, 4]], np.float32)
    assert np.array_equal(dequant.fp8(w, "F8_E4M3", s, "F32", (2, 2)), [[1, 1, 2], [1, 1, 2], [3, 3, 4]])


def test_dequant_rounds_to_the_scale_dtype():
    # (q - z) * s is exact in float32, then rounded once to the scales' dtype: 3 * 0.1 in float16
    q, s = np.array([[3]]), np.array([[0.1]], np.float16)
    got = dequant.int_weight(q, s, "F16")
    assert got.dtype == np.float16 and got[0, 0] == np.float16(np.float32(np.float16(0.1)) * 3)
    bf = dequant.int_weight(q, round_to(np.array([[0.1]], np.float32), "BF16"), "BF16")
    assert bf.dtype == np.uint16  # BF16 bits


# -- properties -------------------------------------------------------------------------------------------------------

@given(bits=st.sampled_from([2, 4, 8]), axis=st.sampled_from([0, 1]), rows=st.integers(1, 9),
       cols=st.integers(1, 40), awq=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_pack_unpack_round_trip(bits, axis, rows, cols, awq, seed):
    order = AWQ_ORDER if awq and bits == 4 else None
    v = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, cols))
    w = pack(v, bits, axis, order)
    per = 32 // bits
    assert w.dtype == np.int32 and w.shape[axis] == -(-v.shape[axis] // per)
    assert np.array_equal(unpack(w, bits, axis, v.shape[axis], order), v)


@given(bits=st.sampled_from([2, 4, 8]), raw=st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=6))
def test_gptq_v1_zero_correction_round_trip(bits, raw):
    w = np.array(raw, np.uint32).view(np.int32)
    assert np.array_equal(gptq_v1_zeros(gptq_to_v1_zeros(w, bits), bits), w)
    assert np.array_equal(gptq_to_v1_zeros(gptq_v1_zeros(w, bits), bits), w)


@given(bits=st.sampled_from([2, 4, 8]), values=st.lists(st.integers(1, 15), min_size=1, max_size=16))
def test_gptq_v1_word_and_field_corrections_agree_without_zero(bits, values):
    # AutoGPTQ adds 1 field by field, GPTQModel adds 0x11...1 to the word: the same unless a true zero point is 0.
    true = np.array([v % (1 << bits) or 1 for v in values])[None]
    stored = gptq_to_v1_zeros(pack(true, bits, axis=1), bits)
    fieldwise = (unpack(stored, bits, axis=1, count=true.shape[1]).astype(int) + 1) % (1 << bits)
    assert np.array_equal(fieldwise, true)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch (the float8 oracle) is not installed")
def test_fp8_tables_match_torch():
    import torch

    codes = torch.arange(256, dtype=torch.uint8)
    for name, dt in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = codes.view(dt).float().numpy()
        got = fp8_table(name)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))


@pytest.mark.skipif(not HAVE_TORCH, reason="torch (the float8 oracle) is not installed")
@given(seed=st.integers(0, 2 ** 31), scale=st.sampled_from([1e-3, 1.0, 100.0, 448.0, 1e4]))
def test_e4m3_encoding_matches_torch(seed, scale):
    import torch

    x = (np.random.default_rng(seed).standard_normal(4096) * scale).astype(np.float32)
    x[:4] = [0.0, -0.0, 448.0, 2.0 ** -10]  # zero, the largest value, half the smallest subnormal (a tie to 0)
    want = torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(float32_to_e4m3(x), want)


@given(seed=st.integers(0, 2 ** 31), bits=st.sampled_from([4, 8]), group=st.sampled_from([-1, 8, 16]),
       symmetric=st.booleans())
def test_rtn_error_is_at_most_half_a_step(seed, bits, group, symmetric):
    w = np.random.default_rng(seed).standard_normal((6, 32)).astype(np.float32)
    w[0] = 0.0  # an all-zero row must not divide by zero
    q, s, z = rtn_int(w, bits, group, symmetric, "F32")
    assert q.min() >= -(1 << (bits - 1)) and q.max() < (1 << (bits - 1))
    g = 32 if group == -1 else group
    back = dequant.int_weight(q, s, "F32", z, (1, g))
    step = np.repeat(s, g, axis=1)
    assert (np.abs(back - w) <= 0.5 * step * (1 + 1e-5) + 1e-7).all()
    assert not back[0].any()


@given(seed=st.integers(0, 2 ** 31))
def test_rtn_fp8_relative_error(seed):
    w = np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)
    codes, s = rtn_fp8(w, "F32")
    back = dequant.fp8(codes, "F8_E4M3", s, "F32", (1, 64))
    amax = np.abs(w).max(axis=1, keepdims=True)
    assert np.allclose(np.abs(back).max(axis=1, keepdims=True), amax, rtol=1e-6)  # the largest maps to 448 exactly
    # e4m3 has 3 mantissa bits: relative error at most 2**-4 for normal values (above 2**-6 * scale)
    normal = np.abs(w) >= 2.0 ** -6 * s
    assert (np.abs(back - w)[normal] <= 2.0 ** -4 * np.abs(w)[normal] + 1e-9).all()
