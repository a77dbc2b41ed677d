"""Train the byte-level BPE tokenizer shipped as core/data/demo_tokenizer.json.

Corpus: docstrings of the Python standard library (available offline everywhere). Run:
    python tools/make_demo_tokenizer.py [--vocab 4096]
"""

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path


def stdlib_docstrings(limit_chars: int = 3_000_000):
    """Yield docstrings of stdlib modules and their members, in a stable order."""
    total = 0
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_"))
    for name in names:
        if name in {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in [(name, mod)] + sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) if (obj is mod or getattr(obj, "__module__", None) == name) else None
            if doc:
                total += len(doc)
                yield doc
                if total > limit_chars:
                    return


def main():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "core" / "data" / "demo_tokenizer.json"))
    args = ap.parse_args()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_docstrings(), trainer=trainer)
    tok.save(args.out)
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
