"""The embedded demo models: one small checkpoint per family, needing no download.

gpt2, llama and qwen3 ship trained ones in core/data/demo/<arch>/ (~1.7M parameters each, trained on
the Python standard library by tools/train_demo.py). A family without a shipped demo (a third-party
plugin's) gets one synthesized on first use from its own spec (random weights, so the text is noise)
with the shipped byte-level BPE tokenizer, and cached. Every demo carries CHAT_TEMPLATE, so that
`archkit chat --arch llama` works with no download.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .registry import default_registry
from .synth import make_config, write_checkpoint

DATA = Path(__file__).parent / "data"
# The demo models never saw a conversation: they were trained on documents joined by <|endoftext|>. So each
# message is rendered as a document of its own ended by that token, and the reply is the next document (it ends
# at EOS, after a docstring-like paragraph, rather than running on). Roles are dropped: the models cannot use them.
CHAT_TEMPLATE = "{%- for message in messages %}{{- message['content'] + eos_token }}{%- endfor %}"
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                    "bos_token": "<|endoftext|>", "add_prefix_space": False, "chat_template": CHAT_TEMPLATE}
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
    if all((out / f).exists() for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json")):
        return out
    tok = DATA / "demo_tokenizer.json"
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    cfg = make_config(spec, vocab_size=vocab, eos_token_ids=0, **SIZES)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(spec, cfg, tmp, std=0.1)
    shutil.copy(tok, tmp / "tokenizer.json")
    config = dict(TOKENIZER_CONFIG, model_max_length=SIZES["max_position_embeddings"])
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
