"""Train the embedded demo models shipped in core/data/demo/<arch>/: one tiny LM per built-in family.

Each family gets a model in its own transformers layout (GPT2LMHeadModel, LlamaForCausalLM,
Qwen3ForCausalLM), all with the shipped 4096-token byte-level BPE (core/data/demo_tokenizer.json),
tied embeddings, ~1.7M parameters, and is saved as a float16 hub checkpoint (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).

Corpus (offline everywhere): the Python standard library of the interpreter running this script —
the source files of the modules in TRAIN_MODULES (code, comments, docstrings) plus every docstring
once more as a document of its own (English prose). Documents are shuffled with a fixed seed and
joined with <|endoftext|> (id 0, the EOS). HELD_OUT modules are never trained on; their text gives
the validation loss (tests/test_demo.py measures perplexity on them too).

Needs torch + transformers + tokenizers; meant for one GPU (bf16 autocast), runs on the CPU for a
smoke test. The shipped models were trained on Python 3.12's stdlib with

    python tools/train_demo.py --out /tmp/demo --seconds 80     # ~80 s of training per model on one GPU

which picks the step count from the measured speed and logs it; `--steps N` reproduces a run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "core" / "data" / "demo_tokenizer.json"
EOS = 0  # <|endoftext|>, the tokenizer's only special token

# Pure-Python stdlib modules and packages (present in 3.10-3.12, lib2to3 up to 3.12; a missing one is skipped and logged).
TRAIN_MODULES = (
    "_collections_abc", "_compression", "_markupbase", "_pydecimal", "_pyio", "_strptime", "_threading_local",
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code", "codecs",
    "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser", "contextlib", "copy",
    "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm", "difflib", "dis", "doctest", "email", "enum",
    "filecmp", "fileinput", "fnmatch", "ftplib", "functools", "genericpath", "getopt", "getpass", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect",
    "io", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes",
    "modulefinder", "multiprocessing", "netrc", "ntpath", "numbers", "opcode", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "string", "struct", "subprocess",
    "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "threading", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zoneinfo",
    "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
    "pydoc_data",  # the language reference's topics as strings: English prose
)
HELD_OUT = ("textwrap", "fractions", "statistics")  # validation text; also what tests/test_demo.py reads
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}

# Shared sizes: head_dim 32, 6 layers, context 512. Parameter counts: ~1.78M (gpt2), ~1.71M (llama, qwen3).
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=128, n_layer=6, n_head=4, n_inner=512, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=384, max_position_embeddings=512)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=384, max_position_embeddings=512)),
}
SAMPLE_PROMPTS = ("Return the number of", "def read_file(path):\n")


def module_files(stdlib: Path, name: str) -> list[Path]:
    """The .py files of one stdlib module or package (tests excluded), in a stable order."""
    if (stdlib / f"{name}.py").is_file():
        return [stdlib / f"{name}.py"]
    pkg = stdlib / name
    if not pkg.is_dir():
        return []
    return sorted(p for p in pkg.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(pkg).parts[:-1]))


def documents(stdlib: Path, modules) -> tuple[list[str], list[str]]:
    """(documents, modules used): each source file, then each of its docstrings as a document."""
    docs, used = [], []
    for name in modules:
        files = module_files(stdlib, name)
        if files:
            used.append(name)
        for f in files:
            src = f.read_text(encoding="utf-8", errors="replace")
            docs.append(src)
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            docs += [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 20]
    return docs, used


def tokenize(docs: list[str]):
    """One int32 stream: every document's ids followed by EOS."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    out = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(EOS)
    return np.asarray(out, dtype=np.int32)


def build_model(family: str, vocab: int, seed: int):
    import torch
    import transformers

    cfg_name, model_name, sizes = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab, tie_word_embeddings=True, bos_token_id=EOS,
                                          eos_token_id=EOS, pad_token_id=None, **sizes)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg)


def batches(stream, batch: int, seq: int, device, seed: int):
    """Endless random windows [batch, seq + 1] of the token stream (on `device`)."""
    import torch

    data = torch.as_tensor(stream, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    span = torch.arange(seq + 1, device=device)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), device=device, generator=g)
        yield data[starts[:, None] + span]


def loss_of(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def make_optimizer(model, lr: float, device):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_steps(model, opt, data, steps: int, args, device, log=None, start=0):
    import torch

    model.train()
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    acc, n = 0.0, 0
    for step in range(start, start + steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.planned, args.lr, args.warmup)
        with ctx:
            loss = loss_of(model, next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None:
            acc, n = acc + loss.detach(), n + 1
            if n == args.log_every or step == start + steps - 1:
                log.append((step + 1, round(float(acc) / n, 4)))
                acc, n = 0.0, 0


@contextlib.contextmanager
def _planned(args, steps):
    """The lr schedule's length while training (calibration uses a dummy one)."""
    args.planned = steps
    yield


def evaluate(model, stream, seq: int, device, windows: int = 64) -> float:
    """Mean next-token loss (nats) over consecutive held-out windows, in float32."""
    import torch

    model.eval()
    data = torch.as_tensor(stream, dtype=torch.long, device=device)
    n = min(windows, (len(data) - 1) // seq)
    x = torch.stack([data[i * seq:i * seq + seq + 1] for i in range(n)])
    with torch.no_grad():
        return float(torch.cat([_losses(model, x[i:i + 16]) for i in range(0, n, 16)]).mean())


def _losses(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")


def samples(model, device) -> dict:
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    out = {}
    for p in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(p).ids], device=device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                 pad_token_id=EOS)
        out[p] = tok.decode(gen[0, ids.shape[1]:].tolist())
    return out


def save(model, family: str, out: Path) -> Path:
    """float16 hub checkpoint + the demo tokenizer (with core.demo's chat template) + generation_config.json."""
    import torch

    from core.demo import TOKENIZER_CONFIG  # the one chat template of shipped and synthesized demos

    d = out / family
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.float16).save_pretrained(d)
    for extra in d.glob("*"):  # keep the layout minimal and deterministic
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(
        dict(TOKENIZER_CONFIG, model_max_length=model.config.max_position_embeddings), indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps({
        "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS, "do_sample": False}, indent=2) + "\n")
    return d


def train_family(family: str, train, val, args, device) -> dict:
    import torch

    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(TOKENIZER)).get_vocab_size()
    steps = args.steps
    if steps is None:  # calibrate: time a few steps of a throwaway model, then fit the budget
        m = build_model(family, vocab, args.seed).to(device)
        opt = make_optimizer(m, args.lr, device)
        data = batches(train, args.batch, args.seq, device, args.seed)
        with _planned(args, 1000):
            train_steps(m, opt, data, 5, args, device)
            _sync(device)
            t = time.perf_counter()
            train_steps(m, opt, data, 20, args, device)
            _sync(device)
        per_step = (time.perf_counter() - t) / 20
        steps = max(50, int(args.seconds / per_step) // 50 * 50)
        del m, opt
    model = build_model(family, vocab, args.seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, args.lr, device)
    data = batches(train, args.batch, args.seq, device, args.seed)
    curve: list = []
    t0 = time.perf_counter()
    with _planned(args, steps):
        train_steps(model, opt, data, steps, args, device, curve)
    _sync(device)
    seconds = time.perf_counter() - t0
    model = model.to(torch.float16).float()  # evaluate exactly what ships: float16 weights, float32 compute
    val_loss = evaluate(model, val, args.seq, device)
    info = dict(family=family, params=params, steps=steps, train_seconds=round(seconds, 1),
                tokens=steps * args.batch * args.seq, final_train_loss=curve[-1][1], val_loss=round(val_loss, 4),
                val_ppl=round(math.exp(val_loss), 2), curve=curve, samples=samples(model, device))
    save(model, family, Path(args.out))
    print(json.dumps({k: v for k, v in info.items() if k != "curve"}, indent=1), flush=True)
    return info


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="writes <out>/<family>/ hub checkpoints and <out>/train_log.json")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, help="training steps per model (default: fit --seconds)")
    ap.add_argument("--seconds", type=float, default=80.0, help="training time per model when --steps is not given")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-docs", type=int, help="smoke test: use only this many documents")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    t = time.perf_counter()
    docs, used = documents(stdlib, TRAIN_MODULES)
    random.Random(args.seed).shuffle(docs)
    val_docs, val_used = documents(stdlib, HELD_OUT)
    if args.max_docs:
        docs = docs[:args.max_docs]
    if len(used) < len(TRAIN_MODULES) // 2:
        raise SystemExit(f"only {len(used)} of {len(TRAIN_MODULES)} modules found under {stdlib}: no stdlib sources?")
    train, val = tokenize(docs), tokenize(val_docs)
    print(f"corpus: Python {sys.version.split()[0]} stdlib, {len(used)} modules, {len(docs)} documents, "
          f"{len(train):,} train tokens, {len(val):,} held-out tokens ({time.perf_counter() - t:.1f} s); device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""), flush=True)
    log = dict(python=sys.version.split()[0], torch=torch.__version__, device=str(device),
               gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
               modules=used, missing=sorted(set(TRAIN_MODULES) - set(used)), held_out=val_used,
               train_tokens=len(train), held_out_tokens=len(val), batch=args.batch, seq=args.seq, lr=args.lr,
               warmup=args.warmup, seed=args.seed, models=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for family in args.families.split(","):
        log["models"].append(train_family(family, train, val, args, device))
        (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
