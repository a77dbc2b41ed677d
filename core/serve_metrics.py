"""`archkit serve`'s /metrics: the engine's counters and the server's latency histograms, in Prometheus text format.

The engine keeps its own counts (core.engine.Engine.stats: queue depth, running requests, KV blocks, tokens);
what only the server sees — time to first token from the moment the HTTP request arrived, the gaps between a
request's tokens, how requests end — is recorded here, on the engine's thread, as each token comes out.
Exposition format: https://prometheus.io/docs/instrumenting/exposition_formats/ (version 0.0.4).
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time

from .engine import FINISH_REASONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "archkit_"
RATE_WINDOW_S = 10.0  # tokens/s is the mean over this many seconds: steps are too bursty to show one by one

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# engine.stats() key → (metric name, type, help)
ENGINE_METRICS = (
    ("waiting", "requests_waiting", "gauge", "Requests queued for admission (queue depth)."),
    ("running", "requests_running", "gauge", "Requests being generated."),
    ("kv_blocks_used", "kv_blocks_used", "gauge", "KV-cache blocks held by requests."),
    ("kv_blocks_total", "kv_blocks_total", "gauge", "KV-cache blocks in the pool."),
    ("kv_blocks_cached", "kv_blocks_cached", "gauge", "KV-cache blocks whose content the prefix cache remembers."),
    ("tokens_generated", "generation_tokens_total", "counter", "Tokens generated."),
    ("prompt_tokens_computed", "prompt_tokens_computed_total", "counter",
     "Prompt tokens computed (prefix-cache hits are not)."),
    ("steps", "engine_steps_total", "counter", "Engine steps (batched forward passes)."),
    ("preemptions", "preemptions_total", "counter", "Requests preempted for lack of KV blocks (recomputed later)."),
    ("prefix_cache_queries", "prefix_cache_queried_blocks_total", "counter", "Full prompt blocks looked up."),
    ("prefix_cache_hits", "prefix_cache_hit_blocks_total", "counter", "Full prompt blocks found in the prefix cache."),
)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (callers hold the lock)."""

    def __init__(self, name: str, help: str, buckets: tuple):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        """Count one observation of `v` seconds."""
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self) -> list[str]:
        """Its exposition lines: HELP, TYPE, one cumulative `_bucket` per bound and +Inf, `_sum`, `_count`."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, c in zip(self.buckets + (math.inf,), self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {total}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """Latency histograms and request counts, fed from the engine's thread and read by /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from the HTTP request's arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between two consecutive tokens of one request.", ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "request_duration_seconds",
                             "Time from the HTTP request's arrival to its last token (or its end).", E2E_BUCKETS)
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.last_token: dict = {}  # engine Request → time of its last token (for the inter-token gaps)
        self.recent: collections.deque = collections.deque()  # (time, tokens) per token event, RATE_WINDOW_S long

    def on_output(self, out, arrival: float) -> None:
        """Record one core.engine.StepOutput of a request whose HTTP request arrived at `arrival` (monotonic)."""
        now = time.monotonic()
        r = out.request
        with self.lock:
            if out.token is not None:
                prev = self.last_token.get(r)
                if prev is None:
                    self.ttft.observe(now - arrival)
                else:
                    self.itl.observe(now - prev)
                self.last_token[r] = now
                self.recent.append(now)
            if out.finish_reason is not None:
                self.last_token.pop(r, None)
                self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1
                self.e2e.observe(now - arrival)
            self._trim(now)

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds (0 when idle)."""
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            return len(self.recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def render(self, stats: dict, up: bool = True) -> str:
        """The whole /metrics page from an engine.stats() snapshot and what was recorded here."""
        lines = [f"# HELP {PREFIX}up 1 while the engine thread runs.", f"# TYPE {PREFIX}up gauge", f"{PREFIX}up {int(up)}"]
        for key, name, kind, help in ENGINE_METRICS:
            if key in stats:
                lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {stats[key]}"]
        rate = self.tokens_per_second()
        lines += [f"# HELP {PREFIX}generation_tokens_per_second Tokens generated per second over the last "
                  f"{RATE_WINDOW_S:g} s.", f"# TYPE {PREFIX}generation_tokens_per_second gauge",
                  f"{PREFIX}generation_tokens_per_second {_num(rate)}"]
        with self.lock:
            name = PREFIX + "requests_finished_total"
            lines += [f"# HELP {name} Engine requests (one per choice) by how they ended.", f"# TYPE {name} counter"]
            lines += [f'{name}{{finish_reason="{k}"}} {v}' for k, v in self.finished.items()]
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.lines()
        return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    """A float sample or bound as Prometheus writes it (+Inf for infinity)."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))
