"""The `archkit` command: list | inspect PATH | generate [PATH] | bench. Errors print one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ArchkitError

EPILOG_GENERATE = """examples:
  archkit generate --arch llama --prompt "Once upon a time"      # the embedded demo model of a family
  archkit generate ./my-ckpt --prompt "def fib(n):" --max-new-tokens 64
  archkit generate ./my-ckpt --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archkit", description="Run decoder-only LMs from Hugging Face checkpoints; "
                                "every family is a plugin.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("list", help="registered families, the plugin and distribution of each, broken plugins",
                   description="List registered families and broken plugins.", epilog="example:\n  archkit list",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ins = sub.add_parser("inspect", help="what a checkpoint directory holds and which family it is",
                         epilog="example:\n  archkit inspect ./my-ckpt", formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("path")
    ins.add_argument("--arch", help="family name (skip detection)")
    gen = sub.add_parser("generate", help="generate text, streamed to stdout", epilog=EPILOG_GENERATE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("path", nargs="?", help="checkpoint directory (omit to use the embedded demo model of --arch)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--arch", help="family name (plugin); default: detect from the checkpoint")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    b = sub.add_parser("bench", help="decode/prefill speed vs the bandwidth roofline (and transformers)",
                       epilog="examples:\n  archkit bench --device cpu --model gpt2-124m --compare-hf\n"
                              "  archkit bench --device cuda --model tinyllama-1.1b --compare-hf --json out.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--model", action="append", help="named config (see --list) or checkpoint dir; repeatable")
    b.add_argument("--list", action="store_true", help="list the named configs")
    b.add_argument("--compare-hf", action="store_true", help="also time transformers on the same checkpoint")
    b.add_argument("--tokens", type=int, default=None, help="decode tokens (default: 32 on cpu, 128 on cuda)")
    b.add_argument("--prompt-tokens", type=int, default=16, help="prompt length before decode")
    b.add_argument("--json", help="write results as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `archkit` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.version:
            from . import __version__
            print(f"archkit {__version__}")
            return 0
        if args.cmd is None:
            _parser().print_help()
            return 2
        return {"list": cmd_list, "inspect": cmd_inspect, "generate": cmd_generate, "bench": cmd_bench}[args.cmd](args)
    except ArchkitError as e:
        print(f"archkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("archkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def cmd_list(args) -> int:
    from .registry import default_registry

    reg = default_registry()
    rows = [(e.spec.name, e.plugin, e.distribution or "-", e.version or "-", e.spec.description) for e in reg.entries()]
    _table(("family", "plugin", "distribution", "version", "description"), rows)
    for b in reg.broken:
        print(f"broken plugin {b.name!r}" + (f" ({b.distribution})" if b.distribution else "") + f": {b.error}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .detect import detect
    from .errors import WeightsError
    from .registry import default_registry
    from .weights import plan

    reg = default_registry()
    ckpt = Checkpoint(args.path)
    print(f"checkpoint   {ckpt.path}")
    sizes = ", ".join(f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in ckpt.files)
    print(f"files        {len(ckpt.files)} safetensors file(s): {sizes}")
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    print(f"tensors      {len(ckpt.tensors)}, {sum(dtypes.values()):,} parameters, "
          + ", ".join(f"{k}: {v:,}" for k, v in sorted(dtypes.items())))
    if args.arch:
        name, how = args.arch, "given with --arch"
        reg[name]
    else:
        d = detect(ckpt, reg)
        name = d.name
        how = f"detected by {d.method}, score {d.score:g}; scores: " + ", ".join(
            f"{n}={s:g}" for n, s in sorted(d.scores.items(), key=lambda kv: -kv[1]))
    print(f"family       {name} ({how})")
    for b in reg.broken:
        print(f"warning      broken plugin {b.name!r}: {b.error}")
    if ckpt.config is None:
        print("config       config.json not found (needed to load)")
        return 1
    spec = reg[name].spec
    cfg = ModelConfig.from_hf(spec, ckpt.config, str(ckpt.path / "config.json"))
    rope = cfg.rope and f"rope {cfg.rope.type} theta={cfg.rope.theta:g}" + (f" factor={cfg.rope.factor:g}" if cfg.rope.type != "default" else "")
    print(f"config       {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads} (kv {cfg.num_kv_heads}, "
          f"head_dim {cfg.head_dim}), mlp {cfg.intermediate_size} {cfg.mlp} {cfg.activation}, vocab {cfg.vocab_size}, "
          f"context {cfg.max_position_embeddings}")
    print(f"             {cfg.norm} eps={cfg.norm_eps:g}, {rope or 'learned positions'}, "
          f"tied embeddings: {cfg.tie_word_embeddings}, qk-norm: {cfg.qk_norm}")
    tok = ckpt.path / "tokenizer.json"
    print(f"tokenizer    {'tokenizer.json' if tok.exists() else 'none (token ids only)'}")
    try:
        p = plan(spec, cfg, ckpt)
        print(f"weights      all {len(p.sources)} expected tensors present with the right shapes")
    except WeightsError as e:
        print(f"weights      {e}")
        return 1
    return 0


def cmd_generate(args) -> int:
    from .load import load

    path = args.path
    if path is None:
        if not args.arch:
            raise _usage("generate needs a checkpoint PATH, or --arch to use that family's embedded demo model")
        from .demo import demo_checkpoint
        path = demo_checkpoint(args.arch)
    model = load(path, arch=args.arch, dtype=args.dtype, device=args.device)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for piece in model.stream_text(args.prompt, **kw):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def cmd_bench(args) -> int:
    from .bench import CONFIGS, run_bench

    if args.list:
        _table(("name", "family", "description"), [(k, v["arch"], v["note"]) for k, v in CONFIGS.items()])
        return 0
    run_bench(args.model or ["gpt2-124m"], device=args.device, compare_hf=args.compare_hf, tokens=args.tokens,
              prompt_tokens=args.prompt_tokens, json_path=args.json)
    return 0


def _usage(msg: str) -> ArchkitError:
    return ArchkitError(msg)


def _table(header, rows) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    for r in [tuple(header)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
