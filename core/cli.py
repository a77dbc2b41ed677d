"""The `archkit` command: list | inspect PATH | generate [PATH] | chat [PATH] | bench | serve | quantize. Errors print
one line."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path

from . import serve  # the serve command's options; starlette and uvicorn are imported only when it runs
from .cli_chat import cmd_chat
from .quant import quantize as quantize_cmd  # `archkit quantize`'s options and command
from .cli_common import (CHAT_COMMANDS, _check_sampling, _checkpoint, _count, _load, _positive_int,  # noqa: F401
                         _sampling, _table, _unescape, _warn_if_greedy)
from .errors import ArchkitError, ConfigError, DeviceError
from .log import logger
from .progress import ProgressBar  # noqa: F401  (importable from here, as before)

EPILOG_GENERATE = """examples:
  archkit generate --arch llama --prompt "Return the number of"  # the embedded demo model of a family
  archkit generate ./my-ckpt --prompt "def fib(n):" --max-new-tokens 64
  archkit generate Qwen/Qwen3-0.6B --prompt "Hi"      # a hub id, from the Hugging Face cache (archkit[hub])
  archkit generate ./my-ckpt --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1
  archkit generate ./my-ckpt --greedy --prompt-file prompt.txt --stop "\\n\\n" --device cpu --dtype float32
  git diff | archkit generate ./my-ckpt --prompt -    # the prompt from stdin

Sampling flags left out take the checkpoint's generation_config.json values (do_sample, temperature,
top_p, top_k, repetition_penalty, max_new_tokens / max_length), as transformers does; a checkpoint without
them decodes greedily. --greedy (or --temperature 0) decodes greedily whatever the checkpoint says.
A prompt from stdin or --prompt-file loses one final newline.
The prompt is echoed and the continuation streamed to stdout as it is generated; generation stops at
--max-new-tokens, at an EOS id (generation_config.json, config.json) or after a --stop string.
"""

EPILOG_CHAT = """examples:
  archkit chat --arch llama                           # the embedded demo model (its text means little)
  archkit chat ./Qwen3-0.6B
  archkit chat ./Llama-3.2-1B-Instruct --system "Answer in one sentence." --temperature 0.7 --top-p 0.9
  printf 'Hi!\\nWhat did I just say?\\n' | archkit chat ./Qwen3-0.6B     # one user turn per input line

The checkpoint's chat template (chat_template.jinja, or "chat_template" in tokenizer_config.json) is
applied to the whole conversation each turn, as transformers' apply_chat_template(...,
add_generation_prompt=True) does; the reply streams until an EOS id such as <|im_end|>. Sampling flags
left out take the checkpoint's generation_config.json values, as in `archkit generate`.
In the conversation:
""" + CHAT_COMMANDS + """
Needs jinja2: pip install 'archkit[chat]'.
"""

EPILOG_INSPECT = """examples:
  archkit inspect ./Llama-3.2-1B
  archkit inspect ./my-ckpt --arch llama      # check a checkpoint against one family's spec
  archkit inspect Qwen/Qwen3-0.6B              # a hub id, from the Hugging Face cache

Prints the files, tensor count and dtypes, the detected family with every plugin's detection score,
the config as the plugin reads it, the generation defaults of generation_config.json, and whether every
tensor the spec expects is present with the right shape (if not: the missing, unexpected and mismatched
tensor names). Reads headers only. With --tp N: which rank holds which slice of every role, and the bytes each
rank reads (a shape that N does not divide is an error naming it).
"""

# Flags that only matter when sampling: given with greedy decoding they change nothing, and we say so.
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archkit", description="Run decoder-only LMs from Hugging Face checkpoints; "
                                "every family is a plugin.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    p.subcommands = {}  # name → its parser, for errors that should show that subcommand's usage
    p.subcommands["list"] = sub.add_parser(
        "list", help="registered families, the plugin and distribution of each, broken plugins",
        description="List registered families and broken plugins.", epilog="example:\n  archkit list",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ins = p.subcommands["inspect"] = sub.add_parser(
        "inspect", help="what a checkpoint directory holds and which family it is",
        description="Summarize a checkpoint directory and check it against its family's spec.",
        epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("path", help="checkpoint directory (config.json, *.safetensors, ...) or hub id (owner/name)")
    ins.add_argument("--arch", help="family name (skip detection)")
    ins.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    ins.add_argument("--tp", type=_positive_int, metavar="N",
                     help="also print the tensor-parallel plan over N ranks: each role's slice per rank, bytes per rank")
    gen = p.subcommands["generate"] = sub.add_parser(
        "generate", help="generate text, streamed to stdout", epilog=EPILOG_GENERATE,
        description="Continue a prompt with a model, streaming the text as it is generated.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("path", nargs="?", help="checkpoint directory or hub id (omit to use the embedded demo model "
                     "of --arch)")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the text to continue; - reads it from stdin")
    what.add_argument("--prompt-file", metavar="FILE", help="read the text to continue from FILE (UTF-8)")
    _model_args(gen, max_new_tokens=64)
    gen.add_argument("--logprobs", type=_count, metavar="K", help="after the text, list each new token's "
                     "log-probability and its K likeliest alternatives (the text then appears at the end, not streamed)")
    chat = p.subcommands["chat"] = sub.add_parser(
        "chat", help="multi-turn chat through the checkpoint's chat template", epilog=EPILOG_CHAT,
        description="Chat with an instruction-tuned checkpoint, one user turn per input line.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("path", nargs="?", help="checkpoint directory or hub id with a chat template (omit to use "
                      "the embedded demo model of --arch)")
    chat.add_argument("--system", help="system message that opens the conversation")
    _model_args(chat, max_new_tokens=256)
    b = p.subcommands["bench"] = sub.add_parser(
        "bench", help="decode/prefill speed vs the bandwidth roofline (and transformers)",
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
    b.add_argument("--quant", choices=("w4a16", "w8a16", "fp8"),
                   help="with --device cuda: decode and prefill of the named shapes with random weights in this "
                        "quantized layout, against fp16 on the same card (core/cuda/bench_quant.py)")
    b.add_argument("--serve", action="store_true",
                   help="many concurrent requests through the engine: output tok/s, TTFT and inter-token latency at "
                        "each --concurrency, vs transformers' batched generate() and the batched roofline")
    b.add_argument("--concurrency", type=_positive_int, action="append",
                   help="with --serve: concurrent requests (repeatable; default 1, 8, 32, 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="with --serve: new tokens per request")
    b.add_argument("--system-tokens", type=int, default=2000,
                   help="with --serve: shared system prompt for the prefix-cache TTFT measurement (0: skip it)")
    srv = p.subcommands["serve"] = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching)",
        description="Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, streaming).")
    serve.add_arguments(srv)
    qz = p.subcommands["quantize"] = sub.add_parser(
        "quantize", help="write a weight-quantized (compressed-tensors) copy of a checkpoint",
        description="Quantize a checkpoint's linear weights by round-to-nearest into a new compressed-tensors "
                    "checkpoint (transformers with the compressed-tensors package, and archkit, load it).",
        epilog="examples:\n  archkit quantize ./Qwen3-0.6B ./Qwen3-0.6B-W4A16 --scheme w4a16\n"
               "  archkit quantize ./ckpt ./ckpt-fp8 --scheme fp8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    quantize_cmd.add_arguments(qz)
    return p


def _model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Options shared by generate and chat: family, device, dtype and sampling (None: the checkpoint's default)."""
    p.add_argument("--arch", help="family name (plugin); default: detect from the checkpoint")
    p.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on the CPU, the checkpoint's half type on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default) picks cuda when PyCUDA and a GPU are present, else cpu")
    p.set_defaults(default_max_new_tokens=max_new_tokens)
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's max_new_tokens (or max_length "
                   f"less the prompt), else {max_new_tokens}")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--temperature", type=float, help="0 = greedy; default: the checkpoint's, else greedy")
    how.add_argument("--greedy", action="store_true", help="greedy decoding whatever the checkpoint's defaults")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding probability p")
    p.add_argument("--min-p", type=float, help="sample among tokens at least min_p times as likely as the likeliest")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default: the checkpoint's, else 1)")
    p.add_argument("--presence-penalty", type=float, help="OpenAI's: subtracted once from each generated token's logit")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's: subtracted per occurrence of a generated token")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", type=_unescape,
                   help=r"stop string (repeatable); \n, \t and \\ are read as newline, tab and backslash")


def _read_prompt(args, parser) -> None:
    """args.prompt from --prompt, stdin (--prompt -) or --prompt-file, one final newline dropped from the latter two."""
    if args.prompt is None and args.prompt_file is None:
        parser.error("one of the arguments --prompt --prompt-file is required")
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"argument --prompt-file: cannot read {args.prompt_file!r} "
                         f"({getattr(e, 'strerror', None) or e})")
    elif args.prompt == "-":
        text = sys.stdin.read()
    else:
        return
    args.prompt = text[:-1] if text.endswith("\n") else text


def _parse(argv):
    """Parse argv; an unknown flag is reported by its subcommand's parser (usage, closest flag), exit 2."""
    p = _parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        sub = p.subcommands.get(args.cmd, p)
        msg = "unrecognized arguments: " + " ".join(extra)
        flag = next((a.split("=", 1)[0] for a in extra if a.startswith("-")), None)
        close = flag and difflib.get_close_matches(flag, [o for a in sub._actions for o in a.option_strings], n=1)
        sub.error(msg + (f" (did you mean {close[0]}?)" if close else ""))
    if args.cmd in ("generate", "chat") and args.path is None and not args.arch:
        p.subcommands[args.cmd].error("give a checkpoint PATH (a directory or hub id), or --arch to use that "
                                      "family's embedded demo model")
    if args.cmd == "generate":
        _read_prompt(args, p.subcommands["generate"])
    return args


class _StderrHandler(logging.Handler):
    """The "archkit" logger's records as `archkit: ...` lines on the current sys.stderr (warnings say so)."""

    def emit(self, record):
        prefix = "archkit: warning: " if record.levelno >= logging.WARNING else "archkit: "
        print(prefix + record.getMessage(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `archkit` console script."""
    args = _parse(argv)
    handler, level, propagate = _StderrHandler(), logger.level, logger.propagate
    logger.addHandler(handler)  # the library logs (device choice, ignored ids); the command shows them
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _run(args)
    finally:  # main() may run inside a longer-lived process (tests, a notebook): leave logging as it was
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _run(args) -> int:
    try:
        if args.version:
            from . import __version__
            print(f"archkit {__version__}")
            return 0
        if args.cmd is None:
            _parser().print_help()
            return 2
        return {"list": cmd_list, "inspect": cmd_inspect, "generate": cmd_generate, "chat": cmd_chat,
                "bench": cmd_bench, "serve": serve.cmd_serve,
                "quantize": quantize_cmd.cmd_quantize}[args.cmd](args)
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
    from .genconfig import GenerationDefaults
    from .hub import resolve
    from .registry import default_registry
    from .weights import plan

    reg = default_registry()
    ckpt = Checkpoint(resolve(args.path, args.revision))
    print(f"checkpoint   {ckpt.path}")
    sizes = ", ".join(f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in ckpt.files)
    print(f"files        {len(ckpt.files)} safetensors file(s): {sizes}")
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    print(f"tensors      {len(ckpt.tensors)}, {sum(dtypes.values()):,} parameters, "
          + ", ".join(f"{k}: {v:,}" for k, v in sorted(dtypes.items())))
    for i, line in enumerate(ckpt.quantization.describe() if ckpt.quantization else ()):
        print(("quantization " if i == 0 else "             ") + line)  # scheme, bits, group size, bytes
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
    defaults = GenerationDefaults.from_hf(ckpt.generation_config, str(ckpt.path / "generation_config.json"))
    print(f"generation   {_describe_defaults(defaults)}")
    try:
        p = plan(spec, cfg, ckpt)
        print(f"weights      all {sum(len(src.infos) for src in p.sources)} expected tensors present with the right shapes")
    except WeightsError as e:
        print(f"weights      {e}")
        return 1
    if args.tp:
        from .tp import TensorParallelPlan
        print("\n".join(TensorParallelPlan.for_weights(spec, p, args.tp).describe(p)))
    return 0


def _describe_defaults(d) -> str:
    """The generation defaults in one line: what sampling applies when no flag says otherwise."""
    given = d.given()
    if not given:
        return "no defaults in generation_config.json (greedy unless sampling flags are given)"
    mode = "greedy" if given.get("temperature") == 0 else "sampling" if "temperature" in given else "greedy"
    keys = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in given.items())
    why = "; do_sample is not true, so the sampling keys are ignored, as in transformers" \
        if mode == "greedy" and given.get("do_sample") is not True and len(given) > 1 else ""
    return f"{mode} by default ({keys}{why})"


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
    _check_sampling(args)
    model = _load(args, _checkpoint(args))
    _warn_if_greedy(args, model)
    ids = model._tokenizer().encode(args.prompt)
    if args.logprobs is not None:
        return _generate_with_logprobs(model, args, ids)
    pieces = model.stream_text(args.prompt, **_sampling(args, model, len(ids)))
    first = next(pieces, "")  # whatever generation rejects (an empty prompt, the context) fails before any output
    out = sys.stdout
    out.write(args.prompt + first)
    out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def _generate_with_logprobs(model, args, ids) -> int:
    """The prompt and continuation, then a table: each new token, its log-probability, the K likeliest alternatives."""
    tok = model._tokenizer()
    new = model.generate(ids, logprobs=args.logprobs, **_sampling(args, model, len(ids)))
    text = tok.decode([t.token for t in new])
    cut = min((text.find(s) for s in args.stop or () if s and s in text), default=-1)
    out = sys.stdout
    out.write(args.prompt + (text[:cut] if cut >= 0 else text) + "\n\n")
    rows = [(repr(tok.decode([t.token])), f"{t.logprob:.4f}",
             ", ".join(f"{tok.decode([i])!r} {lp:.4f}" for i, lp in t.top)) for t in new]
    _table(("token", "logprob", f"top {args.logprobs}"), rows)
    return 0


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
    if args.quant:
        if args.device != "cuda" or args.serve:
            raise ConfigError(f"--quant {args.quant} benchmarks the CUDA kernels that read quantized weights: use it "
                              f"with --device cuda and without --serve (on the CPU a quantized checkpoint is "
                              f"dequantized at load; bench its directory with --model DIR instead)")
        from .load import cuda_available

        ok, why = cuda_available()
        if not ok:
            raise DeviceError(f"device 'cuda' is not usable: {why}")
        from .cuda import bench as cuda_bench, bench_quant

        return bench_quant.main(cuda_bench, args.model or ["qwen3-8b"], args.quant, args.json)
    if args.serve:
        import json as _json
        from pathlib import Path as _Path

        from .bench_serve import CONCURRENCY, bench_serve, table
        prompt = args.prompt_tokens if args.prompt_tokens != 16 else 512  # --serve's own default: 512-token prompts
        results = [bench_serve(m, device=args.device, concurrency=tuple(args.concurrency or CONCURRENCY),
                               prompt_tokens=prompt, new_tokens=args.new_tokens, compare_hf=args.compare_hf,
                               system_tokens=args.system_tokens) for m in (args.model or ["tinyllama-1.1b"])]
        print(table(results))
        if args.json:
            _Path(args.json).write_text(_json.dumps(results, indent=2))
        return 0
    run_bench(args.model or ["gpt2-124m"], device=args.device, compare_hf=args.compare_hf, tokens=args.tokens,
              prompt_tokens=args.prompt_tokens, json_path=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
