"""`archkit serve`: an OpenAI-compatible HTTP server for one model, on Starlette served by uvicorn.

    archkit serve ./Qwen3-0.6B --port 8000 --api-key sk-local
    archkit serve --arch llama                     # the embedded demo model, on http://127.0.0.1:8000/v1

The server is a thin layer over core.engine.Engine (continuous batching over a paged KV cache), which runs on
a thread of its own. Its rooms: core/serve_protocol.py (OpenAI's request and response shapes),
core/serve_worker.py (the engine's thread), core/serve_app.py (routes, streaming, errors, auth),
core/serve_metrics.py (/metrics). This module holds the command line and two ways to run a server: the
command's (blocking, stops on Ctrl-C / SIGTERM) and `start` (a background thread; tests and embedding).
Starlette and uvicorn are the optional extra `serve`: pip install 'archkit[serve]'.

>>> srv = start(core.load("Qwen3-0.6B"), port=0)              # doctest: +SKIP
>>> openai.OpenAI(base_url=srv.url, api_key="-").completions.create(model=srv.model_name, prompt="Hi")  # doctest: +SKIP
>>> srv.stop()                                                 # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import ArchkitError, ServeError
from .log import logger

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing a model to the network is a decision, not a default
DEFAULT_PORT = 8000
API_KEY_ENV = "ARCHKIT_API_KEY"
SERVE_HINT = "pip install 'archkit[serve]' (starlette and uvicorn)"

EPILOG = f"""examples:
  archkit serve --arch llama                      # the embedded demo model of a family
  archkit serve ./Qwen3-0.6B --port 8000 --api-key sk-local --model-name qwen3
  curl http://127.0.0.1:8000/v1/completions -H 'Authorization: Bearer sk-local' \\
       -H 'Content-Type: application/json' -d '{{"model": "qwen3", "prompt": "def fib(n):", "max_tokens": 32}}'

Speaks OpenAI's HTTP API: GET /v1/models, POST /v1/completions and /v1/chat/completions (the checkpoint's
chat template), streamed as server-sent events with "stream": true; GET /health and GET /metrics
(Prometheus). With --api-key (or ${API_KEY_ENV}) every route but /health needs 'Authorization: Bearer KEY'.
Parameters a request leaves out take generation_config.json's values, else greedy decoding.
Install: {SERVE_HINT}.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register `archkit serve`'s options on its subparser."""
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("path", nargs="?", help="checkpoint directory or hub id (omit to serve the demo model of --arch)")
    p.add_argument("--arch", help="family name (plugin); default: detect from the checkpoint")
    p.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset = no key)")
    p.add_argument("--model-name", help="the name clients pass as 'model' (default: the checkpoint directory's name)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default) picks cuda when PyCUDA and a GPU are present, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on the CPU, the checkpoint's half type on CUDA)")
    p.add_argument("--max-running", type=int, help="requests generated at once (default 64)")
    p.add_argument("--max-waiting", type=int, help="requests queued beyond those; more get HTTP 503 (default 1024)")
    p.add_argument("--kv-blocks", type=int, help="KV-cache blocks (default: 4 contexts' worth, at least 8,192 positions)")
    p.add_argument("--block-size", type=int, help="positions per KV block (default 16)")
    p.add_argument("--max-batch-tokens", type=int, help="tokens one engine step computes at most (default 512)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")


def cmd_serve(args) -> int:
    """Run `archkit serve` until interrupted; errors before the server starts are one line."""
    _require_dependencies()
    import uvicorn

    from .progress import ProgressBar
    from .load import load

    path, name = _checkpoint(args)
    sock = _bind(args.host, args.port)  # a busy port fails before a long load, not after
    try:
        model = load(path, arch=args.arch, dtype=args.dtype, device=args.device, progress=ProgressBar(),
                     revision=args.revision)
        app = create_app(model, args.model_name or name, args.api_key, **_engine_config(args))
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    served = app.state.service.served
    print(f"archkit serve: '{served.name}' ({model.spec.name}, {model.device} {model.dtype}, context "
          f"{served.capacity}) on http://{_url_host(host)}:{port}/v1"
          + ("; API key required" if args.api_key else "; no API key"), file=sys.stderr)
    if not args.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"archkit: warning: {host} is reachable from other machines and no --api-key is set", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    print("archkit serve: stopped", file=sys.stderr)
    return 0


def create_app(model, model_name: str | None = None, api_key: str | None = None, **engine_config):
    """The Starlette application serving `model` (keywords: core.engine.EngineConfig fields); its engine thread
    starts and stops with the application's lifespan."""
    _require_dependencies()
    from .engine import Engine, EngineConfig
    from .serve_app import build_app
    from .serve_protocol import ServedModel
    from .serve_worker import EngineWorker

    if model.tokenizer is None:
        raise ServeError(f"{model.path}: archkit serve needs the checkpoint's tokenizer.json (text in and out)")
    engine = Engine(model, EngineConfig(**engine_config))
    capacity = min(model.config.context_limit, engine.pool.num_blocks * engine.pool.block_size)
    template, why = _chat_template(model)
    served = ServedModel(model, model_name or Path(str(model.path)).name or "model", capacity, template, why)
    return build_app(served, EngineWorker(engine), api_key)


class RunningServer:
    """A server running on a background thread (from `start`): its `url` (…/v1), `port`, `app`, the engine's
    `worker` (worker.stats() reads the engine's counters) and `stop()`. Also a context manager."""

    def __init__(self, app, server, thread: threading.Thread, host: str, port: int):
        self.app, self.server, self.thread, self.host, self.port = app, server, thread, host, port
        self.worker = app.state.service.worker
        self.model_name = app.state.service.served.name
        self.url = f"http://{_url_host(host)}:{port}/v1"

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down as on Ctrl-C (requests in flight get the graceful period, then are cancelled) and wait for
        the server and the engine threads to end."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.worker.stop(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(model, host: str = DEFAULT_HOST, port: int = 0, model_name: str | None = None, api_key: str | None = None,
          graceful_timeout: float = 5.0, log_level: str = "warning", **engine_config) -> RunningServer:
    """Serve `model` from a background thread (port 0: a free one) and return once it accepts connections."""
    import uvicorn

    app = create_app(model, model_name, api_key, **engine_config)
    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=graceful_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="archkit-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ServeError(f"the server on {host}:{sock.getsockname()[1]} did not start (see the log above)")
        time.sleep(0.01)
    return RunningServer(app, server, thread, host, sock.getsockname()[1])


def _require_dependencies() -> None:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"archkit serve needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: {SERVE_HINT}")


def _checkpoint(args) -> tuple:
    """(what to load, the model's default public name) for PATH or --arch's demo model."""
    if args.path is not None:
        local = Path(args.path)
        return args.path, (local.resolve().name if local.is_dir() else args.path)
    if not args.arch:
        raise ArchkitError("serve needs a checkpoint PATH, or --arch to serve that family's embedded demo model")
    from .demo import DATA, demo_checkpoint
    path = demo_checkpoint(args.arch)
    if DATA not in path.parents:
        print(f"archkit: note: no trained demo model ships for {args.arch!r}; this one has random weights, so its "
              "text is noise", file=sys.stderr)
    return path, f"demo-{args.arch}"


def _engine_config(args) -> dict:
    given = {"max_running": args.max_running, "max_waiting": args.max_waiting, "num_blocks": args.kv_blocks,
             "block_size": args.block_size, "max_batch_tokens": args.max_batch_tokens}
    return {k: v for k, v in given.items() if v is not None}


def _chat_template(model) -> tuple:
    """(ChatTemplate, None), or (None, why /v1/chat/completions cannot work) — completions serve either way."""
    from .chat import ChatTemplate

    try:
        return ChatTemplate.from_dir(model.path), None
    except ArchkitError as e:
        logger.warning("archkit serve: /v1/chat/completions is off: %s", e)
        return None, f"{e}; /v1/completions works without one"


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (bound here, so a busy port is a one-line error before anything starts)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"port {port!r} must be an integer in [0, 65535]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
