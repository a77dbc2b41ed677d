"""`archkit serve` on the embedded llama demo model, over loopback, driven by the official openai client.

The oracle for every generated token is the library's own solo greedy run (`model.generate` on the same model,
one prompt at a time); the server runs the same requests batched through the engine on its own thread. The
load test sends 120 clients at once — streams, streams that hang up, malformed bodies, oversize prompts — and
then checks each finished stream against its solo run, that no KV block is still held, and that the server
still answers.
"""

import asyncio
import http.client
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the openai client (test extra) drives the server")
pytest.importorskip("starlette", reason="archkit serve needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="archkit serve needs uvicorn (the serve extra)")

import core  # noqa: E402
from core.chat import ChatTemplate  # noqa: E402
from core.demo import demo_checkpoint  # noqa: E402
from core.serve import start  # noqa: E402

NAME, KEY = "demo", "sk-test"
# The demo model writes Python: a conversation rendered as comments, the reply starting a function.
TEMPLATE = "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}def {% endif %}"
PROMPTS = ["def fib(n):", "import os\n", "class Stack:", "Return the number of", "    def __init__(self, x):",
           "# Copyright", "for i in range(", "def read(path):\n    \"\"\"", "x = [", "raise ValueError("]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "llama"
    shutil.copytree(demo_checkpoint("llama"), d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return core.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    srv = start(model, model_name=NAME, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def solo(model):
    """The oracle: model.generate alone, greedy, memoized per (prompt ids, max_new_tokens)."""
    memo = {}

    def run(ids, n):
        key = (tuple(ids), n)
        if key not in memo:
            memo[key] = model.generate(list(ids), max_new_tokens=n, temperature=0)
        return memo[key]
    return run


def chat_ids(ckpt, model, messages):
    text = ChatTemplate.from_dir(ckpt).render(messages, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


def boundary_stop(model, out) -> str:
    """Three characters of the text of `out` that span two tokens (two from one, one from the next) and occur there
    first: a stream that did not hold text back would show the first two before the stop is complete."""
    texts = [model.tokenizer.decode(out[:j]) for j in range(len(out) + 1)]
    full = texts[-1]
    for j in range(1, len(out)):
        end = len(texts[j])
        stop = full[end - 2:end + 1]
        if end - len(texts[j - 1]) >= 2 and len(stop) == 3 and full.find(stop) == end - 2:
            return stop
    raise AssertionError(f"no stop string spans two tokens of {full!r}")


def raw(server, method, path, body=b"", headers=None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    ctype = resp.getheader("content-type", "")
    return resp.status, json.loads(data) if ctype.startswith("application/json") else data


def wait_idle(server, timeout=20.0) -> dict:
    """The engine's stats once nothing waits or runs (aborts reach the engine thread asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        s = server.worker.stats()
        if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def finished(server, reason: str) -> int:
    return server.worker.metrics.finished[reason]


# -- the API ------------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_tokens_equal_the_solo_greedy_run(client, model, solo):
    for prompt, n in (("def fib(n):", 12), ("class Stack:", 5)):
        ids = model.tokenizer.encode(prompt)
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"return_token_ids": True})
        c = r.choices[0]
        assert c.token_ids == solo(ids, n)
        assert c.text == model.tokenizer.decode(solo(ids, n))
        assert c.finish_reason == ("stop" if solo(ids, n)[-1] in model.eos_token_ids else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(solo(ids, n)))
        assert r.usage.total_tokens == len(ids) + len(solo(ids, n))
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # shorter than one KV block


def test_several_prompts_and_n_choices_come_back_in_order(client, model, solo):
    prompts = ["import os\n", "x = ["]
    r = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.token_ids == solo(model.tokenizer.encode(prompts[c.index // 2]), 6)
    assert r.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in prompts)  # each prompt once
    ids = model.tokenizer.encode("def f():")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0)  # token ids as the prompt
    assert r.choices[0].text == model.tokenizer.decode(solo(ids, 4))


def test_stream_carries_the_same_text_tokens_and_usage(client, model, solo):
    ids = model.tokenizer.encode("def read(path):")
    whole = client.completions.create(model=NAME, prompt="def read(path):", max_tokens=20, temperature=0)
    stream = client.completions.create(model=NAME, prompt="def read(path):", max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"return_token_ids": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert text == whole.choices[0].text
    assert tokens == solo(ids, 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_are_cut_in_whole_and_streamed_responses(client, model, solo):
    ids = model.tokenizer.encode("def fib(n):")
    out = solo(ids, 24)
    full = model.tokenizer.decode(out)
    stop = boundary_stop(model, out)
    cut = full[:full.find(stop)]
    for stops in (stop, [stop, "never seen #@!"]):
        r = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=24, temperature=0, stop=stops,
                                      extra_body={"return_token_ids": True})
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
        assert r.choices[0].token_ids == solo(ids, 24)[:len(r.choices[0].token_ids)]
        pieces = [c.choices[0].text for c in client.completions.create(
            model=NAME, prompt="def fib(n):", max_tokens=24, temperature=0, stop=stops, stream=True)]
        assert "".join(pieces) == cut
    r = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=24, temperature=0, stop="never #@!")
    assert r.choices[0].text == full


def test_n_sampled_choices_use_seed_plus_index(client, model):
    ids = model.tokenizer.encode("class Stack:")
    kw = dict(model=NAME, prompt="class Stack:", max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=3,
              extra_body={"return_token_ids": True})
    r = client.completions.create(**kw)
    for c in r.choices:
        assert c.token_ids == model.generate(ids, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11 + c.index)
    assert len({tuple(c.token_ids) for c in r.choices}) > 1  # three seeds, not one draw three times
    assert [c.token_ids for c in client.completions.create(**kw).choices] == [c.token_ids for c in r.choices]


def test_every_sampling_parameter_reaches_the_engine(client, model):
    ids = model.tokenizer.encode("def read(path):")
    greedy = dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.3)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, **greedy,
                                  extra_body={"repetition_penalty": 1.3, "return_token_ids": True})
    assert r.choices[0].token_ids == model.generate(ids, max_new_tokens=12, repetition_penalty=1.3, **greedy)
    sampled = dict(temperature=0.8, top_p=0.9, seed=3)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, **sampled,
                                  extra_body={"top_k": 20, "min_p": 0.05, "return_token_ids": True})
    assert r.choices[0].token_ids == model.generate(ids, max_new_tokens=12, top_k=20, min_p=0.05, **sampled)


def test_usage_counts_prefix_cache_hits(client, model):
    prompt = "def walk(top, topdown=True, onerror=None, followlinks=False):\n    \"\"\"Directory tree generator.\n\n" \
             "    For each directory in the directory tree rooted at top (including top itself)"
    n = len(model.tokenizer.encode(prompt))
    assert n > 32  # two full KV blocks of 16 and more
    client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens == n
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16  # every full block but the last token's


def test_completion_logprobs_match_the_library(client, model):
    ids = model.tokenizer.encode("Return the number of")
    r = client.completions.create(model=NAME, prompt="Return the number of", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ref = model.generate(ids, max_new_tokens=6, temperature=0, logprobs=3)
    assert lp.tokens == [model.tokenizer.decode([t.token], skip_special_tokens=False) for t in ref]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref], abs=1e-4)
    for top, t in zip(lp.top_logprobs, ref):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(t.top[0][1], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_uses_the_checkpoint_template(client, model, ckpt, solo):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    ids = chat_ids(ckpt, model, messages)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == model.tokenizer.decode(solo(ids, 12))
    assert r.choices[0].token_ids == solo(ids, 12) and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == m.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # content parts and the "developer" role are what newer clients send
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Sort "}, {"type": "text", "text": "a list"}]}]
    r2 = client.chat.completions.create(model=NAME, messages=parts, max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == m.content
    r3 = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=3, temperature=0)
    assert r3.usage.completion_tokens == 3 and r3.choices[0].finish_reason == "length"


def test_chat_logprobs_have_openai_shape(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode() == item.token


@pytest.mark.parametrize("kw, param, code", [
    (dict(temperature=-1), "temperature", None),
    (dict(top_p=1.5), "top_p", None),
    (dict(extra_body={"top_k": -3}), "top_k", None),  # extensions go in extra_body
    (dict(max_tokens=0), "max_tokens", None),
    (dict(max_tokens="many"), "max_tokens", None),
    (dict(n=0), "n", None),
    (dict(logprobs=21), "logprobs", None),
    (dict(seed=-1), "seed", None),
    (dict(presence_penalty=3), "presence_penalty", None),
    (dict(stop=[1, 2]), "stop", None),
    (dict(prompt=[99999]), "prompt", None),
    (dict(prompt=""), "prompt", None),
    (dict(prompt="word " * 600), "prompt", "context_length_exceeded"),
    (dict(prompt="x", max_tokens=600), "prompt", "context_length_exceeded"),
    (dict(stream_options={"include_usage": True}), "stream_options", None),
])
def test_bad_completion_requests_are_400_naming_the_parameter(client, kw, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": NAME, "prompt": "def f():", **kw})
    assert e.value.status_code == 400 and e.value.param == param and e.value.code == code
    assert e.value.type == "invalid_request_error"


@pytest.mark.parametrize("kw, param, code", [
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content", None),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", None),
    (dict(messages=[]), "messages", None),
    (dict(top_logprobs=2), "top_logprobs", None),
    (dict(messages=[{"role": "user", "content": "word " * 600}]), "messages", "context_length_exceeded"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", None),
])
def test_bad_chat_requests_are_400_naming_the_parameter(client, kw, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": NAME, "messages": [{"role": "user", "content": "hi"}], **kw})
    assert e.value.param == param and e.value.code == code


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_malformed_bodies_and_routes_get_openai_shaped_errors(server):
    for body in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b""):
        status, out = raw(server, "POST", "/v1/completions", body)
        assert status == 400 and set(out["error"]) == {"message", "type", "param", "code"}, body
    assert raw(server, "POST", "/v1/completions", b'{"prompt": "hi"}')[1]["error"]["param"] == "model"
    status, out = raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and "unknown route" in out["error"]["message"]
    assert raw(server, "GET", "/v1/completions")[0] == 405
    status, out = raw(server, "POST", "/v1/completions", b"{}", {"Content-Length": str(1 << 30)})
    assert status == 413 and out["error"]["code"] == "request_too_large"


def test_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    for headers in ({"Authorization": ""}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        assert raw(server, "GET", "/v1/models", headers=headers)[0] == 401
        assert raw(server, "GET", "/metrics", headers=headers)[0] == 401
    assert raw(server, "GET", "/health", headers={"Authorization": ""}) == (200, {"status": "ok"})


def test_metrics_page(server, client):
    client.completions.create(model=NAME, prompt="def g():", max_tokens=3, temperature=0)
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    samples = dict(re.findall(r"^(archkit_[^\s]+) (\S+)$", text, re.M))
    for name in ("requests_waiting", "requests_running", "kv_blocks_used", "kv_blocks_total",
                 "generation_tokens_total", "generation_tokens_per_second", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", 'requests_finished_total{finish_reason="abort"}'):
        assert "archkit_" + name in samples, name
    assert float(samples["archkit_generation_tokens_total"]) >= 3
    assert float(samples["archkit_kv_blocks_total"]) == server.worker.stats()["kv_blocks_total"]
    buckets = [float(v) for k, v in samples.items() if k.startswith("archkit_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == float(samples["archkit_time_to_first_token_seconds_count"]) > 0
    assert "# TYPE archkit_inter_token_latency_seconds histogram" in text


def test_a_client_that_hangs_up_frees_its_blocks(server, client):
    before = finished(server, "abort")
    stream = client.completions.create(model=NAME, prompt="x", max_tokens=500, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    # a plain (non-streamed) request whose client leaves while it is generated is cancelled too
    sock = http.client.HTTPConnection(server.host, server.port, timeout=10)
    sock.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": 500}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    time.sleep(0.1)
    sock.sock.close()
    s = wait_idle(server)
    assert s["running"] == s["waiting"] == 0 and s["kv_blocks_used"] == 0
    assert finished(server, "abort") == before + 2


# -- the load test ------------------------------------------------------------------------------------------
async def _raw_async(port, body: bytes, read: int | None = None, path="/v1/completions", length=None):
    """Send one POST; read the whole response (read=None → its status) or `read` bytes, then hang up."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length if length is not None else len(body)}\r\n"
            "Connection: close\r\n\r\n")
    w.write(head.encode() + body)
    await w.drain()
    try:
        if read is None:
            return int((await r.readline()).split()[1])
        if read:
            await r.read(read)
        return None
    finally:
        w.close()


async def _load(server, model, ckpt, n_clients=120, seed=15):
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    done, counts = [], {"drop": 0}

    async def complete(prompt, n):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                                 extra_body={"return_token_ids": True})
        toks, text, reason = [], "", None
        async for c in stream:
            toks += c.choices[0].token_ids
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        done.append((model.tokenizer.encode(prompt), n, toks, text, reason))

    async def chat(content, n):
        messages = [{"role": "user", "content": content}]
        stream = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=n, temperature=0,
                                                      stream=True, extra_body={"return_token_ids": True})
        toks, text, reason = [], "", None
        async for c in stream:
            toks += c.choices[0].token_ids
            text += c.choices[0].delta.content or ""
            reason = c.choices[0].finish_reason or reason
        done.append((chat_ids(ckpt, model, messages), n, toks, text, reason))

    async def drop(prompt, after):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=200, temperature=0, stream=True)
        counts["drop"] += 1
        k = 0
        async for _ in stream:
            k += 1
            if k >= after:
                break
        await stream.close()

    async def raw_drop(prompt, read):
        body = json.dumps({"model": NAME, "prompt": prompt, "max_tokens": 200, "stream": True}).encode()
        await _raw_async(server.port, body, read=read)

    async def malformed(kind):
        body = {0: b"{\"model\": \"demo\", \"prompt\": ", 1: b"[]", 2: b'{"model": "demo", "prompt": 5}',
                3: b'{"model": "demo", "prompt": "x", "temperature": "hot"}'}.get(kind)
        if kind == 4:  # the client promises more body than it sends, then leaves
            return await _raw_async(server.port, b'{"model": ', read=0, length=500)
        assert await _raw_async(server.port, body) == 400

    async def oversize(words):
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model=NAME, prompt="word " * words, max_tokens=8)
        assert e.value.code == "context_length_exceeded"

    jobs = []
    for i in range(n_clients):
        kind = rng.choices(["complete", "chat", "drop", "raw_drop", "malformed", "oversize"], [55, 10, 20, 10, 8, 8])[0]
        prompt = rng.choice(PROMPTS)
        jobs.append({"complete": lambda: complete(prompt, rng.randint(3, 14)),
                     "chat": lambda: chat(prompt, rng.randint(3, 10)),
                     "drop": lambda: drop(prompt, rng.randint(0, 3)),
                     "raw_drop": lambda: raw_drop(prompt, rng.choice([0, 1, 300])),
                     "malformed": lambda: malformed(rng.randint(0, 4)),
                     "oversize": lambda: oversize(rng.randint(520, 2000))}[kind]())
    peak = 0

    async def watch():  # how many requests the engine held at once: the clients really were concurrent
        nonlocal peak
        while True:
            s = await asyncio.to_thread(server.worker.stats)
            peak = max(peak, s["running"] + s["waiting"])
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait_for(asyncio.gather(*jobs), timeout=50)
    finally:
        watcher.cancel()
        await client.close()
    return done, counts["drop"], peak


def test_load_many_concurrent_clients(server, model, ckpt, solo):
    aborted = finished(server, "abort")
    t0 = time.monotonic()
    done, drops, peak = asyncio.run(_load(server, model, ckpt))
    assert time.monotonic() - t0 < 50
    assert len(done) > 50 and drops > 10
    print(f"load: {len(done)} streams finished, {drops} hung up, at most {peak} requests in the engine at once")
    assert peak >= 48
    for ids, n, toks, text, reason in done:
        assert toks == solo(ids, n), model.tokenizer.decode(ids)
        assert text == model.tokenizer.decode(toks)
        assert reason == ("stop" if toks[-1] in model.eos_token_ids else "length")
    s = wait_idle(server)
    assert s["running"] == s["waiting"] == 0 and s["kv_blocks_used"] == 0, s
    assert finished(server, "abort") - aborted >= drops  # every hang-up was cancelled, not run to the end
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    r = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert raw(server, "GET", "/health")[0] == 200


# -- queue limits, shutdown, the command --------------------------------------------------------------------
def test_a_full_queue_is_503(model):
    with start(model, model_name=NAME, max_running=1, max_waiting=1) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        kw = dict(model=NAME, prompt="x", max_tokens=500, temperature=0, stream=True)
        running = client.completions.create(**kw)
        next(iter(running))
        waiting = client.completions.create(**kw)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        running.close()
        waiting.close()
        s = wait_idle(srv)
        assert s["kv_blocks_used"] == 0 and s["running"] == s["waiting"] == 0


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(model):
    with start(model, model_name=NAME) as srv:
        engine, armed = srv.worker.engine, []
        real_step = engine.step

        def step():  # a forward pass that blows up once when armed (a kernel failure, a bug)
            if armed:
                armed.pop()
                raise RuntimeError("simulated forward failure")
            return real_step()
        engine.step = step
        client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        armed.append(1)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=NAME, prompt="x", max_tokens=8)
        assert e.value.code == "generation_failed" and "simulated forward failure" in e.value.message
        armed.append(1)
        with pytest.raises(openai.APIError, match="simulated forward failure"):
            list(client.completions.create(model=NAME, prompt="x", max_tokens=8, stream=True))
        assert client.completions.create(model=NAME, prompt="x", max_tokens=3).usage.completion_tokens == 3
        assert wait_idle(srv)["kv_blocks_used"] == 0


def test_stop_ends_the_engine_thread_and_cancels_requests_in_flight(model):
    # 4 x 500 tokens take seconds; the graceful period is much shorter, so they are cut, not finished
    srv = start(model, model_name=NAME, graceful_timeout=0.05)
    client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
    stream = client.completions.create(model=NAME, prompt="x", max_tokens=500, n=4, temperature=0, stream=True)
    next(iter(stream))
    reqs = srv.worker.call(lambda engine: list(engine.running)).result(10)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 10
    assert not srv.thread.is_alive() and not srv.worker.thread.is_alive()
    assert len(reqs) == 4 and all(r.finish_reason == "abort" for r in reqs), [(r.finish_reason, len(r.output)) for r in reqs]
    assert srv.worker.engine.pool.num_used == 0
    stream.close()


def test_cli_serve_runs_until_interrupted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "core", "serve", "--arch", "llama", "--port", "0", "--device", "cpu",
                             "--log-level", "warning", "--api-key", KEY], stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("/v1" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        url = re.search(r"(http://\S+/v1)", "".join(lines)).group(1)
        assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        req = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
        assert json.load(urllib.request.urlopen(req, timeout=30))["data"][0]["id"] == "demo-llama"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    reader.join(5)
    assert "archkit serve: stopped" in "".join(lines)


def test_cli_serve_errors_are_one_line(capsys):
    from core.cli import main

    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    import socket
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--arch", "llama", "--device", "cpu", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("archkit: error") == 1
    assert main(["serve", "--arch", "llama", "--device", "cpu", "--max-running", "0"]) == 1
    assert "max_running=0" in capsys.readouterr().err
