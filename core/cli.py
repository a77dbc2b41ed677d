"""The `archkit` command: list | inspect PATH | generate [PATH] | chat PATH | bench. Errors print one line."""

from __future__ import annotations

import argparse
import re
import sys
import time

from .errors import ArchkitError

EPILOG_GENERATE = """examples:
  archkit generate --arch llama --prompt "Return the number of"  # the embedded demo model of a family
  archkit generate ./my-ckpt --prompt "def fib(n):" --max-new-tokens 64
  archkit generate ./my-ckpt --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1
  archkit generate ./my-ckpt --prompt "def f():" --stop "\\n\\n" --device cpu --dtype float32

The prompt is echoed and the continuation streamed to stdout as it is generated; generation stops at
--max-new-tokens, at an EOS id (generation_config.json, config.json) or after a --stop string.
"""

EPILOG_CHAT = """examples:
  archkit chat ./Qwen3-0.6B
  archkit chat ./Llama-3.2-1B-Instruct --system "Answer in one sentence." --temperature 0.7 --top-p 0.9
  printf 'Hi!\\nWhat did I just say?\\n' | archkit chat ./Qwen3-0.6B     # one user turn per input line

The checkpoint's chat template (chat_template.jinja, or "chat_template" in tokenizer_config.json) is
applied to the whole conversation each turn, as transformers' apply_chat_template(...,
add_generation_prompt=True) does; the reply streams until an EOS id such as <|im_end|>.
In the conversation: /reset forgets it (the --system message stays), /exit or Ctrl-D ends it.
Needs jinja2: pip install 'archkit[chat]'.
"""

EPILOG_INSPECT = """examples:
  archkit inspect ./Llama-3.2-1B
  archkit inspect ./my-ckpt --arch llama      # check a checkpoint against one family's spec

Prints the files, tensor count and dtypes, the detected family with every plugin's detection score,
the config as the plugin reads it, and whether every tensor the spec expects is present with the
right shape (if not: the missing, unexpected and mismatched tensor names). Reads headers only.
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
                         description="Summarize a checkpoint directory and check it against its family's spec.",
                         epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("path", help="checkpoint directory (config.json, *.safetensors, ...)")
    ins.add_argument("--arch", help="family name (skip detection)")
    gen = sub.add_parser("generate", help="generate text, streamed to stdout", epilog=EPILOG_GENERATE,
                         description="Continue a prompt with a model, streaming the text as it is generated.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("path", nargs="?", help="checkpoint directory (omit to use the embedded demo model of --arch)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    _model_args(gen, max_new_tokens=64)
    chat = sub.add_parser("chat", help="multi-turn chat through the checkpoint's chat template", epilog=EPILOG_CHAT,
                          description="Chat with an instruction-tuned checkpoint, one user turn per input line.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("path", help="checkpoint directory with a chat template")
    chat.add_argument("--system", help="system message that opens the conversation")
    _model_args(chat, max_new_tokens=256)
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


def _model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Options shared by generate and chat: family, device, dtype and sampling."""
    p.add_argument("--arch", help="family name (plugin); default: detect from the checkpoint")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on the CPU, the checkpoint's half type on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default) picks cuda when PyCUDA and a GPU are present, else cpu")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding probability p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", type=_unescape,
                   help=r"stop string (repeatable); \n, \t and \\ are read as newline, tab and backslash")


def _unescape(s: str) -> str:
    r"""'\n\n' typed in a shell → two newlines (only \n, \t and \\ are escapes)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], s)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


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
        return {"list": cmd_list, "inspect": cmd_inspect, "generate": cmd_generate, "chat": cmd_chat,
                "bench": cmd_bench}[args.cmd](args)
    except ArchkitError as e:
        print(f"archkit: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment's fault (disk, permissions, a closed terminal), not a bug: one line too
        if isinstance(e, BrokenPipeError):
            return 0
        print(f"archkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("archkit: interrupted", file=sys.stderr)
        return 130


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
    print(f"layout       {_layout(cfg)}")
    if cfg.num_experts:
        sparse = sum(cfg.sparse_layer(i) for i in range(cfg.num_layers))
        print(f"experts      {cfg.num_experts} of {cfg.expert_dim}, top {cfg.num_experts_per_tok} by {cfg.router_scoring}"
              f"{' renormalised' if cfg.moe_renormalize else ''}, shared {cfg.shared_expert_intermediate_size or 'none'}, "
              f"{sparse} of {cfg.num_layers} layers sparse")
    tok = ckpt.path / "tokenizer.json"
    print(f"tokenizer    {'tokenizer.json' if tok.exists() else 'none (token ids only)'}")
    try:
        p = plan(spec, cfg, ckpt)
        print(f"weights      all {sum(len(src.infos) for src in p.sources)} expected tensors present with the right shapes")
    except WeightsError as e:
        print(f"weights      {e}")
        return 1
    return 0


def _layout(cfg) -> str:
    """The block layout, norm placement, rotary pairing and multipliers of a config, in one line."""
    parts = [f"{cfg.block} block", f"{cfg.norm_placement}-norm"]
    if cfg.rope is not None:
        rot = cfg.rope.rotary_dims(cfg.head_dim)
        parts.append(f"rope {cfg.rope_style} over {rot} of {cfg.head_dim} dims")
    for name in ("embed_multiplier", "residual_multiplier", "attention_multiplier", "logit_multiplier",
                 "attn_softcap", "logit_softcap"):
        if getattr(cfg, name) is not None:
            parts.append(f"{name}={getattr(cfg, name):g}")
    return ", ".join(parts)


def cmd_generate(args) -> int:
    path = args.path
    if path is None:
        if not args.arch:
            raise _usage("generate needs a checkpoint PATH, or --arch to use that family's embedded demo model")
        from .demo import DATA, demo_checkpoint
        path = demo_checkpoint(args.arch)
        if DATA not in path.parents:
            shipped = ", ".join(sorted(d.parent.name for d in (DATA / "demo").glob("*/config.json")))
            print(f"archkit: note: no trained demo model ships for {args.arch!r}; this one has random weights, "
                  f"so its text is noise (trained demos: {shipped})", file=sys.stderr)
    model = _load(args, path)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for piece in model.stream_text(args.prompt, **_sampling(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .chat import Chat, ChatTemplate
    from .checkpoint import Checkpoint
    from .errors import GenerationError

    Checkpoint(args.path)  # a missing or malformed directory is reported as such, not as "no chat template"
    template = ChatTemplate.from_dir(args.path)  # no template or no jinja2: fail before reading any weights
    model = _load(args, args.path)
    chat = Chat(model, system=args.system, template=template)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"archkit chat: {model.spec.name} from {args.path}; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    out = sys.stdout
    for line in _user_lines(interactive):
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            continue
        if not line.strip():
            continue
        try:
            for piece in chat.stream(line, **_sampling(args)):
                out.write(piece)
                out.flush()
        except GenerationError as e:  # typically the conversation outgrew the context: say so, keep going
            if not interactive:
                raise
            print(f"archkit: error: {e} (/reset starts over)", file=sys.stderr)
            continue
        out.write("\n")
        out.flush()
    return 0


def _user_lines(interactive: bool):
    """User turns: prompted lines from a terminal (with line editing), else one per input line."""
    if not interactive:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    try:
        import readline  # noqa: F401  (arrow keys and history in input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


class ProgressBar:
    """load(progress=...) callback drawing a loading bar on stderr: percent, bytes, file k/n, rate.

    Checkpoints under `min_bytes` load too fast to need one. On a terminal the bar redraws in place;
    otherwise (logs, CI) checkpoints of `log_bytes` or more get a plain line at each quarter.
    """

    def __init__(self, stream=None, min_bytes: int = 64 << 20, log_bytes: int = 1 << 30, width: int = 28):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_bytes, self.log_bytes, self.width = min_bytes, log_bytes, width
        self.t0, self.last, self.quarter, self.shown = time.monotonic(), -1.0, -1, 0

    def __call__(self, done: int, total: int, file_no: int, files: int) -> None:
        if total < (self.min_bytes if self.tty else self.log_bytes):
            return
        now, frac = time.monotonic(), done / total if total else 1.0
        if self.tty:
            if done < total and now - self.last < 0.1:
                return
            self.last = now
            fill = int(frac * self.width)
            line = f"loading {frac:4.0%} |{'#' * fill}{'.' * (self.width - fill)}| " + self._numbers(done, total, file_no, files, now)
            self.stream.write("\r" + line.ljust(self.shown) + ("\n" if done >= total else ""))  # pad over a longer last line
            self.stream.flush()
            self.shown = len(line)
        elif int(frac * 4) > self.quarter:
            self.quarter = int(frac * 4)
            print(f"loading {frac:4.0%} " + self._numbers(done, total, file_no, files, now), file=self.stream, flush=True)

    def _numbers(self, done, total, file_no, files, now) -> str:
        rate = done / max(now - self.t0, 1e-9)
        shard = f", file {file_no}/{files}" if files > 1 else ""
        return f"{_bytes(done)} / {_bytes(total)}{shard}, {_bytes(rate)}/s"


def _bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, like the file sizes `inspect` prints)."""
    if n < 1000:
        return f"{n:.0f} B"
    unit = next((u for u, k in (("GB", 1e9), ("MB", 1e6)) if n >= k), "KB")
    return f"{n / {'GB': 1e9, 'MB': 1e6, 'KB': 1e3}[unit]:.1f} {unit}"


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .bench_shapes import named_configs, pick_spec

    if args.list:
        from .config import ModelConfig
        rows = []
        for k, raw in named_configs().items():
            spec = pick_spec(raw)
            c = ModelConfig.from_hf(spec, raw)
            rows.append((k, spec.name, c.num_layers, c.hidden_size, f"{c.num_heads}/{c.num_kv_heads}", c.vocab_size))
        _table(("name", "family", "layers", "hidden", "heads/kv", "vocab"), rows)
        return 0
    run_bench(args.model or ["gpt2-124m"], device=args.device, compare_hf=args.compare_hf, tokens=args.tokens,
              prompt_tokens=args.prompt_tokens, json_path=args.json)
    return 0


def _load(args, path):
    """core.load for a command; says which device "auto" chose only once loading succeeded (errors stay one line)."""
    from .load import load

    model = load(path, arch=args.arch, dtype=args.dtype, device=args.device, progress=ProgressBar(), quiet=True)
    if args.device == "auto":
        print(f"archkit: device auto → {model.device} ({model.backend.dtype})", file=sys.stderr)
    return model


def _usage(msg: str) -> ArchkitError:
    return ArchkitError(msg)


def _table(header, rows) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    for r in [tuple(header)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
