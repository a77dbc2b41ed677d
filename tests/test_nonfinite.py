"""Non-finite logits at a decode step after the first (issue 17): a typed error naming that step, on the CPU and on
the GPU, where the flag rides with the picked token (step.cu's ring, GPU sampling's out[1]) instead of a host sync.

The checkpoint is synthesized (core.synth) with untied embeddings, and every embedding row NaN except the
prompt's: the prompt's logits are finite (step 0 picks a token from them), and unless that token is one of the
prompt's own, the next step reads a NaN row, so its logits are NaN: step 1 must raise.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import core
from core.errors import NonFiniteLogitsError
from core.load import cuda_available
from core.synth import make_config, write_checkpoint

OK, WHY = cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not OK, reason=f"needs PyCUDA and an NVIDIA GPU: {WHY}")])]
PROMPT = [5, 17, 101, 230]
KINDS = {"greedy": {}, "sampled": dict(temperature=0.8, top_k=40, seed=3),
         "greedy with a repetition penalty": dict(repetition_penalty=1.3)}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    spec = core.default_registry()["llama"].spec
    c = make_config(spec, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=256, max_position_embeddings=256)
    path = write_checkpoint(spec, c, tmp_path_factory.mktemp("nan") / "llama", std=0.1)
    f = next(path.glob("*.safetensors"))
    t = load_file(f)
    assert "lm_head.weight" in t, "the test needs untied embeddings"
    keep = np.zeros(t["model.embed_tokens.weight"].shape[0], bool)
    keep[PROMPT] = True
    t["model.embed_tokens.weight"][~keep] = np.nan
    save_file(t, f)
    return path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_logits_after_the_first_step_name_that_step(poisoned, device, kind):
    m = core.load(poisoned, device=device, quiet=True)
    first = m.generate(PROMPT, max_new_tokens=1, **KINDS[kind])[0]
    if first in PROMPT:
        pytest.skip(f"step 0 picked prompt token {first}, whose row is finite: no NaN reaches step 1")
    with pytest.raises(NonFiniteLogitsError, match="step 1"):
        m.generate(PROMPT, max_new_tokens=6, **KINDS[kind])
    # the model is still usable afterwards (nothing is left half-done on the device)
    assert m.generate(PROMPT, max_new_tokens=1, **KINDS[kind])[0] == first


def test_the_host_pick_follows_the_gpu_rule():
    """gpu_sampling.pick (the eager steps' argmax on the CUDA backend) flags what the GPU flags: NaN (either sign)
    or +inf anywhere, or every logit -inf; -inf among finite values is a masked logit."""
    from core.cuda.gpu_sampling import pick

    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    assert pick(x) == int(np.argmax(x))
    x[:10] = -np.inf
    assert pick(x) == int(np.argmax(x))
    for bad in (np.nan, -np.float32(np.nan), np.inf):
        y = x.copy()
        y[77] = bad
        with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
            pick(y)
    with pytest.raises(NonFiniteLogitsError):
        pick(np.full(8, -np.inf, np.float32))
