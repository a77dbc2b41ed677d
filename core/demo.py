"""The embedded demo models: one small checkpoint per family, needing no download.

gpt2, llama and qwen3 ship trained ones in core/data/demo/<arch>/ (~1.7M parameters each, trained on
the Python standard library by tools/train_demo.py). A family without a shipped demo (a third-party
plugin's) gets one synthesized on first use from its own spec (random weights, so the text is noise)
with the shipped byte-level BPE tokenizer, and cached.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .registry import default_registry
from .synth import make_config, write_checkpoint

DATA = Path(__file__).parent / "data"
SIZES = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
             max_position_embeddings=512)


def cache_dir() -> Path:
    """Where synthesized demo checkpoints live ($ARCHKIT_CACHE, else ~/.cache/archkit)."""
    return Path(os.environ.get("ARCHKIT_CACHE") or Path.home() / ".cache" / "archkit")


def demo_checkpoint(arch: str) -> Path:
    """Path of the demo checkpoint of family `arch`, building it on first use."""
    shipped = DATA / "demo" / arch
    if (shipped / "config.json").exists():
        return shipped
    spec = default_registry()[arch].spec
    out = cache_dir() / "demo" / arch
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    tok = DATA / "demo_tokenizer.json"
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    cfg = make_config(spec, vocab_size=vocab, eos_token_ids=0, **SIZES)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(spec, cfg, tmp, std=0.1)
    shutil.copy(tok, tmp / "tokenizer.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
