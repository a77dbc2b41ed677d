"""Chat templates against transformers' apply_chat_template, the Chat conversation, and `archkit chat`."""

import io
import json
import shutil
import sys

import pytest
from hypothesis import given, strategies as st

import core
from conftest import needs_torch
from core.chat import Chat, ChatTemplate, find_template
from core.cli import main
from core.demo import demo_checkpoint
from core.errors import ChatTemplateError

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


def test_bad_templates_are_one_line_chat_template_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        find_template(demo_checkpoint("llama"))
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


def test_cli_chat_without_template_is_one_line_error(capsys):
    assert main(["chat", str(demo_checkpoint("llama")), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("archkit: error: ") and "no chat template" in err and err.count("\n") == 1
