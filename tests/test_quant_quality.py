"""Quality of `archkit quantize` on the embedded demo models: perplexity against the fp32 model's on held-out text.

The held-out text is tests/test_demo.py's: the source of the stdlib modules tools/train_demo.py never trained on
(HELD_OUT: textwrap, fractions, statistics), every 256-token window of it (119 windows, ~30,000 tokens). Until
2026-12-07 this measured 6 windows (1,536 tokens), which proved too few: quantizations differing in small ways moved
it by several points (llama, GPTQ: +3.9% there, +9.7% on the whole text).

The issue's bars: within 1% for w8a16 and fp8, within 5% for w4a16 with groups of 128. Measured on the whole text
(2026-12-07): w8a16 llama -0.04%, qwen3 -0.07% (met); fp8 round-to-nearest llama +0.44% (met), qwen3 +1.04% (missed
by 0.04 points; the test bound here is 1.5%, so a regression still fails; with `--calibrate`, GPTQ on the E4M3 grid,
qwen3 +0.90%, met, pinned in tests/test_quant_gptq.py); w4a16 round-to-nearest llama +13.2%, qwen3 +11.6%. These
models are 128 wide, so a group of 128 is a whole row of every matrix (one scale per output channel), and
round-to-nearest cannot reach 5%: the w4a16 test here pins what it gives. `archkit quantize --calibrate TEXT` (GPTQ
with a per-row search of the range's shrink factor and, since 2026-12-07, of the column order, stored or act-order,
core/quant/gptq.py; tests/test_quant_gptq.py) gives symmetric qwen3 +4.2% (met), llama +5.6% (not met), and with
`--asym` qwen3 +4.8%, llama +4.8% (met). Tried before the shrink search and not kept (measured on the 6 windows, so
only their direction counts): act-order with static groups (re-measured on the whole text with the search: alone it
helps llama and hurts qwen3; chosen per row it is what the 5% now rests on), dampening 0.001 / 0.05 / 0.2, an
MSE-searched clip of each group's weights inside GPTQ, calibrating each layer on the already quantized layers'
outputs (sequential GPTQ: qwen3 asym +9.2% against +8.0% one-shot, llama sym +4.4% against +3.9%).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import core
from core.demo import demo_checkpoint
from core.quant.quantize import quantize
from test_demo import held_out_windows, nll

FAMILIES = ("llama", "qwen3")  # gpt2's demo stores Conv1D weights, which compressed-tensors cannot target


def perplexity(model) -> float:
    """exp of the mean next-token NLL over every 256-token window of the held-out modules (~30,000 tokens)."""
    windows = held_out_windows(model.tokenizer, whole=True)
    return math.exp(np.concatenate([nll(model.logits(ids), ids) for ids in windows]).mean())


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    """(family, perplexity of its fp32 demo model)."""
    model = core.load(demo_checkpoint(request.param), device="cpu", quiet=True)
    return request.param, perplexity(model)


@pytest.mark.parametrize("scheme, group, bound", [("w8a16", None, 0.01), ("fp8", None, 0.015), ("w4a16", 128, 0.16)])
def test_quantized_demo_perplexity(tmp_path, base, scheme, group, bound):
    family, ppl = base
    out = quantize(demo_checkpoint(family), tmp_path / "q", scheme, group)
    assert out["quantized"] == 42 and out["bytes_after"] < out["bytes_before"]
    model = core.load(tmp_path / "q", device="cpu", quiet=True)
    ratio = perplexity(model) / ppl
    print(f"{family} {scheme} g{group}: perplexity x{ratio:.4f}")
    assert ratio < 1 + bound, f"{family} {scheme}: perplexity {ratio:.4f}x the fp32 model's"
