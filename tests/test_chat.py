"""Chat templates against transformers' apply_chat_template, the Chat conversation, and `archkit chat`."""

import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import core
from conftest import needs_torch
from core.chat import Chat, ChatTemplate, find_template
from core.cli import main
from core.demo import demo_checkpoint
from core.errors import ChatBusyError, ChatTemplateError

pytest.importorskip("jinja2", reason="jinja2 (the `chat` extra) is not installed")

# Written after the hub's own templates: Qwen2.5 (ChatML with a default system message and tools),
# Llama 3 (bos_token, header ids, trim), and one exercising the rest of transformers' environment:
# raise_exception, loop controls, namespace, tojson without HTML escaping, {% generation %} blocks.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- if tools %}{{- '<tools>' + (tools | tojson) + '</tools>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
STRICT = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' %}[A{{ ns.n }}] {% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}
  {% else %}[U{{ ns.n }}] {{ m | tojson }}
  {% endif %}
  {% if ns.n >= 6 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[A{{ ns.n + 1 }}] {% endif %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "strict": STRICT}
TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is <b>2</b> & 3?  "}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there.", "tool_calls": None},
     {"role": "user", "content": 'Say "é" {{ not jinja }}'}],
]


def hf_tokenizer(template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(core.demo.DATA / "demo_tokenizer.json"), chat_template=template,
                                   **TOKENS)


def with_template(tmp_path, template, how="tokenizer_config"):
    """A copy of the llama demo checkpoint that carries `template`."""
    d = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint("llama"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if how == "jinja":
        (d / "chat_template.jinja").write_text(template)
    elif how == "list":
        cfg["chat_template"] = [{"name": "tool_use", "template": "nope"}, {"name": "default", "template": template}]
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@needs_torch
@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_matches_transformers(name, conv, gen_prompt):
    msgs = CONVERSATIONS[conv]
    want = hf_tokenizer(TEMPLATES[name]).apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    assert ChatTemplate(TEMPLATES[name], TOKENS).render(msgs, add_generation_prompt=gen_prompt) == want


@needs_torch
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=40)), min_size=1, max_size=8),
       st.sampled_from(sorted(TEMPLATES)), st.booleans())
def test_render_matches_transformers_on_any_text(turns, name, gen_prompt):
    msgs = [{"role": r, "content": c} for r, c in turns]
    want = hf_tokenizer(TEMPLATES[name]).apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    assert ChatTemplate(TEMPLATES[name], TOKENS).render(msgs, add_generation_prompt=gen_prompt) == want


@needs_torch
def test_tools_are_rendered_as_json_like_transformers():
    tools = [{"type": "function", "function": {"name": "f", "description": "a < b & c", "parameters": {}}}]
    msgs = CONVERSATIONS[0]
    want = hf_tokenizer(CHATML).apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(CHATML, TOKENS).render(msgs, tools=tools) == want


@pytest.mark.parametrize("how", ["tokenizer_config", "jinja", "list"])
def test_template_is_found_where_transformers_looks(tmp_path, how):
    d = with_template(tmp_path, LLAMA3, how)
    source, origin = find_template(d)
    assert source == LLAMA3
    assert origin.name == ("chat_template.jinja" if how == "jinja" else "tokenizer_config.json")
    assert ChatTemplate.from_dir(d).render([{"role": "user", "content": "x"}]).startswith("<|endoftext|><|start_header_id|>user")


def without_template(tmp_path):
    """A copy of the llama demo checkpoint whose tokenizer_config.json has no chat template."""
    d = tmp_path / "plain"
    shutil.copytree(demo_checkpoint("llama"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_bad_templates_are_one_line_chat_template_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        find_template(without_template(tmp_path))
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        ChatTemplate(STRICT).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        d = with_template(tmp_path, LLAMA3, "list")
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = cfg["chat_template"][:1]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        find_template(d)


def test_missing_jinja2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 now raises ImportError
    with pytest.raises(ChatTemplateError, match=r"archkit\[chat\]"):
        ChatTemplate(CHATML)


@needs_torch
def test_chat_turns_are_transformers_prompts_plus_archkit_greedy(tmp_path):
    """Each turn's prompt ids equal transformers' apply_chat_template(tokenize=True) of the history so far."""
    d = with_template(tmp_path, CHATML)
    model = core.load(d, device="cpu", quiet=True)
    hf = hf_tokenizer(CHATML)
    chat = Chat(model, system="You write Python.")
    history = [{"role": "system", "content": "You write Python."}]
    for user in ("Return the number of", "def read_file(path):"):
        history.append({"role": "user", "content": user})
        ids = hf.apply_chat_template(history, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        want = model.tokenizer.decode(model.generate(ids, max_new_tokens=12))
        assert chat.send(user, max_new_tokens=12) == want
        history.append({"role": "assistant", "content": want})
        assert chat.messages == history
    chat.reset()
    assert chat.messages == history[:1]


@needs_torch
def test_cli_chat_streams_each_turn(tmp_path, monkeypatch, capsys):
    d = with_template(tmp_path, LLAMA3)
    chat = Chat(core.load(d, device="cpu", quiet=True))
    hello, then = (chat.send(u, max_new_tokens=10) for u in ("hello", "and then?"))
    # a blank line is skipped, /reset starts over, /exit ends before the last line
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/reset\nhello\nand then?\n/exit\nnever sent\n"))
    assert main(["chat", str(d), "--device", "cpu", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == hello + "\n" + hello + "\n" + then + "\n"


def test_cli_chat_without_template_is_one_line_error(tmp_path, capsys):
    assert main(["chat", str(without_template(tmp_path)), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("archkit: error: ") and "no chat template" in err and err.count("\n") == 1


# -- the demo models' chat template ------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_demo_models_ship_a_chat_template_transformers_renders_alike(arch):
    from transformers import AutoTokenizer

    d = demo_checkpoint(arch)
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == core.demo.CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return the number of"}]
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_dir(d).render(msgs) == want == "Be brief.<|endoftext|>Return the number of<|endoftext|>"


def test_chat_with_a_demo_model_needs_no_download(monkeypatch, capsys):
    model = core.load(demo_checkpoint("llama"), device="cpu", quiet=True)
    chat = Chat(model)
    want = [chat.send(u, max_new_tokens=12) for u in ("Hello!", "Return the number of")]
    assert all(want)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\nReturn the number of\n"))
    assert main(["chat", "--arch", "llama", "--device", "cpu", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == want[0] + "\n" + want[1] + "\n"


def test_a_synthesized_demo_has_the_template_too(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHKIT_CACHE", str(tmp_path))
    d = demo_checkpoint("mistral")  # no trained demo ships for mistral: built from its spec
    assert tmp_path in d.parents
    assert find_template(d)[0] == core.demo.CHAT_TEMPLATE
    assert Chat(core.load(d, device="cpu", quiet=True)).send("hi", max_new_tokens=3) is not None


# -- the chat loop: commands, multi-line input, Ctrl-C -----------------------------------------------
def chat_cli(monkeypatch, capsys, stdin: str, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", "--arch", "llama", "--device", "cpu", "--max-new-tokens", "6", *flags])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if not line.startswith("archkit: device")]


def test_chat_commands(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "conv.json"
    code, out, err = chat_cli(monkeypatch, capsys, f"/help\n/nosuch\n/rest\nhi\n/save {saved}\n/reset\n/save\n"
                                                   f"/save {tmp_path}/no/such/dir/x.json\n", "--system", "S")
    reply = Chat(core.load(demo_checkpoint("llama"), device="cpu", quiet=True), system="S").send("hi", max_new_tokens=6)
    assert code == 0 and out == reply + "\n"  # only "hi" reached the model
    assert err[0] == "commands:" and any("/save FILE" in line for line in err) and any('"""' in line for line in err)
    errors = [line for line in err if line.startswith("archkit: error: ")]
    assert len(errors) == 4 and "unknown command '/nosuch'" in errors[0] and "did you mean /reset?" in errors[1]
    assert "/save needs a file name" in errors[2] and "cannot write" in errors[3]
    assert json.loads(saved.read_text()) == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": reply}]
    assert "archkit: conversation reset (the system message stays)" in err


def test_chat_multi_line_input(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "conv.json"
    stdin = ('first \\\nsecond\n"""\ndef f():\n    return 1\n"""\n"""one line"""\n//usr is a folder\n'
             f"/save {saved}\n")
    code, out, err = chat_cli(monkeypatch, capsys, stdin)
    users = [m["content"] for m in json.loads(saved.read_text()) if m["role"] == "user"]
    assert code == 0 and users == ["first \nsecond", "\ndef f():\n    return 1\n", "one line", "/usr is a folder"]
    assert len(out.splitlines()) >= 4


def test_ctrl_c_stops_the_reply_and_a_second_one_at_the_prompt_exits(tmp_path, monkeypatch, capsys):
    import builtins

    from core.model import Model

    real = Model.stream_text_ids
    stopped = []

    def interrupted_once(self, ids, **kw):  # Ctrl-C arrives while the first reply is being generated
        for i, piece in enumerate(real(self, ids, **kw)):
            if i == 1 and not stopped:
                stopped.append(True)
                raise KeyboardInterrupt
            yield piece

    script = iter(["hello", f"/save {tmp_path / 'a.json'}", KeyboardInterrupt, "hello", KeyboardInterrupt,
                   KeyboardInterrupt, "never read"])

    def scripted_input(prompt=""):
        item = next(script)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr(Model, "stream_text_ids", interrupted_once)
    monkeypatch.setattr(builtins, "input", scripted_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    assert main(["chat", "--arch", "llama", "--device", "cpu", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert stopped and next(script) == "never read"  # the chat ended at the second Ctrl-C in a row
    assert json.loads((tmp_path / "a.json").read_text()) == []  # the stopped turn was dropped
    assert "reply stopped" in err and "Ctrl-C again" in err
    reply = Chat(core.load(demo_checkpoint("llama"), device="cpu", quiet=True)).send("hello", max_new_tokens=6)
    assert out.endswith(reply + "\n")  # the one Ctrl-C at the prompt did not end it: "hello" was answered
    stopped.clear()
    script = iter(["hello", KeyboardInterrupt, "never read"])  # Ctrl-C stops a reply, the next one at the prompt exits
    assert main(["chat", "--arch", "llama", "--device", "cpu", "--max-new-tokens", "6"]) == 0
    assert stopped and next(script) == "never read"


# -- untrusted templates: bounded in time and size, every failure a ChatTemplateError (issue 17) ---------------
ATTACKS = {
    # name: (template, a fragment of the error naming the bound or the cause)
    "huge power": ("{{ 2 ** (10 ** 10) }}", "bits, over the bound of 65536"),
    "huge power of a variable": ("{% set n = 10 ** 10 %}{{ 2 ** n }}", "bits, over the bound"),
    "squaring in a loop": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                           "{% endfor %}", "bits passed the bound"),
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                     "ran longer than the bound of 0.5 s"),
    "nested loops over a list": ("{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}"
                                 "{% endfor %}", "ran longer than the bound"),
    "string times a huge number": ("{{ 'x' * 10 ** 10 }}", "times passes the bound of 16777216"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}", "characters passed the bound of 16777216"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "passes the bound of 16777216"),
    "doubling a block": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set t %}{{ ns.s }}{{ ns.s }}"
                         "{% endset %}{% set ns.s = t %}{% endfor %}", "passed the bound"),
    # (chunks of 10^6 characters reach the output bound in 17 iterations, ~0.02 s; with 10^3-character chunks the
    # 16,777 iterations took 0.5-0.7 s and raced the time bound the test sets on a loaded 2-core machine)
    "huge output": ("{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}", "output passed the bound of 16777216"),
    "center filter": ("{{ 'x'|center(10 ** 10) }}", "filter 'center' was given 10000000000"),
    "center method": ("{{ 'x'.center(10 ** 10) }}", "calling 'center' was given 10000000000"),
    "format width": ("{{ '{:>10000000000}'.format(1) }}", "str.format formatting with a field width over the bound"),
    "printf width": ("{{ '%10000000000d' % 1 }}", "% formatting with a field width over the bound"),
    "replace": ("{{ ('x' * 10000)|replace('x', 'x' * 100000) }}", "replace would build a string of 1000000000"),
    "join": ("{{ range(100000)|join('x' * 1000000) }}", "join would build a string of"),
    "recursion": ("{% macro m(a) %}{{ m(a) }}{% endmacro %}{{ m(1) }}", "RecursionError"),
    "division by zero": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "float overflow": ("{{ 2.0 ** 100000 }}", "OverflowError"),
    "type error": ("{{ 1 + 'a' }}", "TypeError: unsupported operand"),
    "int too long for str": ("{{ 10 ** 5000 }}", "ValueError: Exceeds the limit"),
    "memory error": ("{{ boom() }}", "MemoryError"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_templates_are_bounded(name, monkeypatch):
    """Each used to hang, exhaust memory or escape untyped; each is now a one-line ChatTemplateError naming the bound
    or the cause, within the time bound."""
    monkeypatch.setattr(core.chat, "RENDER_SECONDS", 0.5)
    source, fragment = ATTACKS[name]

    def boom():
        raise MemoryError()

    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as ei:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}], boom=boom)
    assert time.monotonic() - t0 < 10
    assert fragment in str(ei.value) and "\n" not in str(ei.value) and len(str(ei.value)) < 400, str(ei.value)


def test_bounds_leave_real_templates_alone(monkeypatch):
    """Long conversations in real templates render, under the bounds, exactly as before."""
    msgs = [{"role": ("user", "assistant")[i % 2], "content": "hello world " * 200} for i in range(300)]
    for source in TEMPLATES.values():
        if source is not STRICT:
            out = ChatTemplate(source, TOKENS).render(msgs)
            assert out.count("hello world") == 300 * 200
    # big numbers are fine where they are values, not sizes
    ok = "{{ '%d' % 10**12 }} {{ '{} {}'.format(10**12, 1) }} {{ x|default(10**10) }} {{ '%5.2f'|format(3.14159) }}"
    assert ChatTemplate(ok).render([]) == "1000000000000 1000000000000 1 10000000000  3.14"


def test_tracer_is_restored():
    """The time bound traces the render only: a debugger's or coverage's tracer is back afterwards."""
    def mine(frame, event, arg):
        return None

    old = sys.gettrace()
    sys.settrace(mine)
    try:
        with pytest.raises(ChatTemplateError):
            ChatTemplate("{{ 1 // 0 }}").render([])
        assert sys.gettrace() is mine
    finally:
        sys.settrace(old)


def test_template_files_are_bounded_and_must_be_utf8(tmp_path):
    d = with_template(tmp_path, LLAMA3, "jinja")
    (d / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff\xfe")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja: the chat template is not UTF-8 text \(byte 0xff"):
        ChatTemplate.from_dir(d)
    os.truncate(d / "chat_template.jinja", (1 << 20) + 1)  # sparse: nothing of it may be read
    with pytest.raises(ChatTemplateError, match=r"the chat template is 1048577 bytes, over the 1 MiB archkit reads for it"):
        ChatTemplate.from_dir(d)
    d2 = with_template(tmp_path / "2", "x" * ((1 << 20) + 1))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: the chat template is over the bound"):
        ChatTemplate.from_dir(d2)
    (d2 / "tokenizer_config.json").write_bytes(b'{"chat_template": "\xff"}')
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json is not valid JSON"):
        ChatTemplate.from_dir(d2)


def test_messages_must_be_a_list_of_dicts():
    with pytest.raises(ChatTemplateError, match="messages must be a list of dicts"):
        ChatTemplate(CHATML).render(["hi"])


# -- one conversation, one turn at a time (issue 17) -----------------------------------------------------------
def test_chat_refuses_a_second_turn_while_one_is_under_way(tmp_path):
    """Two threads sharing a Chat used to interleave their turns silently; the second now gets ChatBusyError,
    and the conversation stays a clean alternation of user and assistant turns."""
    model = core.load(with_template(tmp_path, CHATML), device="cpu", quiet=True)
    chat = Chat(model)
    started, release, seen = threading.Event(), threading.Event(), []

    def first():
        for piece in chat.stream("Return the number of", max_new_tokens=8):
            started.set()
            release.wait(30)
        seen.append("done")

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    with pytest.raises(ChatBusyError, match=r"Chat\.stream\(\) while another turn of this conversation is under way"):
        chat.send("def f():", max_new_tokens=4)
    with pytest.raises(ChatBusyError):
        chat.reset()
    release.set()
    t.join(30)
    assert seen == ["done"] and [m["role"] for m in chat.messages] == ["user", "assistant"]
    chat.send("def f():", max_new_tokens=4)  # free again
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_chat_refuses_a_turn_inside_its_own_stream(tmp_path):
    chat = Chat(core.load(with_template(tmp_path, CHATML), device="cpu", quiet=True))
    stream = chat.stream("Return the number of", max_new_tokens=8)
    next(stream)
    with pytest.raises(ChatBusyError):
        chat.send("again")
    stream.close()  # an abandoned turn frees the conversation and takes its user message back
    assert chat.messages == [] and chat.send("again", max_new_tokens=2) is not None


def test_cli_chat_input_that_is_not_utf8_is_one_line(tmp_path):
    """A byte that is not UTF-8 on stdin reaches Python as a lone surrogate: a one-line TokenizerError, exit 1."""
    import subprocess

    d = with_template(tmp_path, CHATML)
    r = subprocess.run([sys.executable, "-m", "core", "chat", str(d), "--device", "cpu", "--max-new-tokens", "2"],
                       input=b"hi\xff\n", capture_output=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1 and err.count("\n") == 1 and err.startswith("archkit: error: "), err
    assert "U+DCFF" in err and "the byte 0xff" in err


def test_cli_chat_with_a_hostile_template_is_one_line(tmp_path, monkeypatch, capsys):
    d = with_template(tmp_path, "{{ 2 ** (10 ** 10) }}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(d), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("archkit: error: ") and "over the bound" in err and err.count("\n") == 1
