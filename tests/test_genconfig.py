"""generation_config.json defaults (core/genconfig.py), as transformers reads them, applied by the CLI; special token
ids outside the vocabulary loaded with a warning; the library logging instead of printing."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest

import core
from conftest import needs_torch
from core.cli import main
from core.demo import demo_checkpoint
from core.errors import ConfigError
from core.genconfig import GenerationDefaults, read_generation_config
from tinyckpt import LLAMA_CONFIG, write_checkpoint

PROMPT = "Return the number of"
QWEN3 = {"bos_token_id": 0, "do_sample": True, "eos_token_id": [0], "temperature": 0.6, "top_k": 20, "top_p": 0.95}

# generation_config.json contents → whether transformers samples (True) or decodes greedily (False).
MODES = [
    ({}, False),
    (QWEN3, True),
    ({"do_sample": True}, True),
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, False),
    ({"temperature": 0.6}, False),  # without do_sample transformers ignores it (and warns)
    ({"do_sample": None, "top_k": 5}, False),
]


def demo_with(tmp_path, generation_config: dict):
    """A copy of the llama demo checkpoint with `generation_config` as its generation_config.json."""
    d = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint("llama"), d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, **generation_config}))
    return d


@pytest.mark.parametrize("raw,samples", MODES)
def test_do_sample_decides_greedy_or_sampling_as_transformers_does(raw, samples, tmp_path):
    d = GenerationDefaults.from_hf(raw)
    assert (d.temperature not in (None, 0.0)) == samples
    if raw.get("do_sample") is False or (raw and not samples):
        assert d.temperature == 0.0
    assert d.top_k == raw.get("top_k") and d.top_p == raw.get("top_p")
    assert GenerationDefaults.from_hf({"do_sample": True}).temperature == 1.0  # transformers' default temperature


@needs_torch
@pytest.mark.parametrize("raw,samples", MODES)
def test_modes_agree_with_transformers(raw, samples, tmp_path):
    from transformers import GenerationConfig

    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    mode = GenerationConfig.from_pretrained(tmp_path).get_generation_mode()
    assert ("sample" in str(mode).lower()) == samples, mode
    d = read_generation_config(tmp_path)
    assert (d.temperature not in (None, 0.0)) == samples


def test_read_generation_config_file_dir_and_absent(tmp_path):
    assert read_generation_config(tmp_path) == GenerationDefaults()  # no file: no defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({**QWEN3, "max_length": 100, "min_p": None}))
    d = read_generation_config(tmp_path)
    assert d == read_generation_config(tmp_path / "generation_config.json")
    assert d.given() == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 100}


@pytest.mark.parametrize("key,value,rule", [("top_p", 1.5, "in (0, 1]"), ("top_p", 0, "in (0, 1]"),
                                            ("temperature", -1, ">= 0"), ("top_k", -3, "integer >= 0"),
                                            ("top_k", 2.5, "integer >= 0"), ("do_sample", "yes", "true or false"),
                                            ("repetition_penalty", 0, "> 0"), ("min_p", 2, "in [0, 1]"),
                                            ("max_new_tokens", -1, "integer >= 0"), ("temperature", "0.6", "number")])
def test_bad_values_are_config_errors_naming_the_key(key, value, rule):
    with pytest.raises(ConfigError, match=re.escape(f"gen.json: {key}={value!r}") + ".*" + re.escape(rule)):
        GenerationDefaults.from_hf({"do_sample": True, key: value}, "gen.json")


def test_hostile_values_give_short_one_line_errors():
    for raw in ({"temperature": 10**400}, {"top_k": "k" * 10**5}, {"do_sample": [True] * 10**4}):
        with pytest.raises(ConfigError) as e:
            GenerationDefaults.from_hf(raw, "gen.json")
        assert len(str(e.value)) < 120 and "\n" not in str(e.value)


def test_resolve_fills_only_what_the_caller_left_none():
    d = GenerationDefaults.from_hf({**QWEN3, "repetition_penalty": 1.1, "max_length": 50})
    kw = d.resolve({"temperature": None, "top_k": 5, "top_p": None, "max_new_tokens": None, "seed": 1}, prompt_len=8)
    assert kw == {"temperature": 0.6, "top_k": 5, "top_p": 0.95, "min_p": None, "repetition_penalty": 1.1,
                  "max_new_tokens": 42, "seed": 1}
    assert d.resolve({"temperature": 0.0})["temperature"] == 0.0  # an explicit 0 (greedy) is not "not given"
    assert d.resolve({}, prompt_len=8, context=20)["max_new_tokens"] == 12  # a default never overflows the context
    assert d.resolve({"max_new_tokens": 99}, prompt_len=8, context=20)["max_new_tokens"] == 99  # the caller's is kept
    assert GenerationDefaults(max_new_tokens=7, max_length=50).resolve({}, prompt_len=8)["max_new_tokens"] == 7
    assert GenerationDefaults().resolve({"top_k": None}) == dict.fromkeys(
        ("top_k", "temperature", "top_p", "min_p", "repetition_penalty", "max_new_tokens"))


def test_load_sets_the_models_generation_defaults(tmp_path):
    assert core.load(demo_with(tmp_path, QWEN3), device="cpu", quiet=True).generation_defaults == \
        GenerationDefaults.from_hf(QWEN3)
    shipped = core.load(demo_checkpoint("llama"), device="cpu", quiet=True).generation_defaults
    assert shipped == GenerationDefaults(do_sample=False, temperature=0.0)  # the demos say do_sample: false


# -- the CLI --------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main(["generate", *map(str, argv), "--device", "cpu", "--prompt", PROMPT])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_applies_the_checkpoints_sampling_defaults(tmp_path, capsys):
    d = demo_with(tmp_path, {**QWEN3, "max_new_tokens": 9})
    model = core.load(d, device="cpu", quiet=True)
    sampled = model.generate_text(PROMPT, temperature=0.6, top_k=20, top_p=0.95, max_new_tokens=9, seed=3)
    greedy = model.generate_text(PROMPT, max_new_tokens=9, temperature=0.0)
    hotter = model.generate_text(PROMPT, temperature=1.5, top_k=20, top_p=0.95, max_new_tokens=9, seed=3)
    assert len({sampled, greedy, hotter}) == 3  # else this test could not tell them apart
    assert run(capsys, d, "--seed", 3)[1] == PROMPT + sampled + "\n"
    assert run(capsys, d, "--greedy")[1] == PROMPT + greedy + "\n"
    assert run(capsys, d, "--temperature", 0)[1] == PROMPT + greedy + "\n"
    assert run(capsys, d, "--seed", 3, "--temperature", 1.5)[1] == PROMPT + hotter + "\n"


def test_cli_max_length_counts_the_prompt(tmp_path, capsys):
    d = demo_with(tmp_path, {"max_length": 11})
    model = core.load(d, device="cpu", quiet=True)
    n = len(model.tokenizer.encode(PROMPT))
    want = model.generate_text(PROMPT, max_new_tokens=11 - n)
    assert want != model.generate_text(PROMPT, max_new_tokens=12 - n)
    assert run(capsys, d)[1] == PROMPT + want + "\n"


@pytest.mark.parametrize("flags,warned", [(["--top-k", "5", "--seed", "1"], "--top-k, --seed change nothing"),
                                          (["--greedy", "--top-p", "0.5"], "--top-p changes nothing"),
                                          (["--min-p", "0.1"], "--min-p changes nothing"),
                                          (["--top-k", "5", "--temperature", "0.8"], None),
                                          (["--repetition-penalty", "1.2"], None)])
def test_cli_warns_when_sampling_flags_meet_greedy_decoding(flags, warned, capsys):
    code, out, err = run(capsys, "--arch", "llama", "--max-new-tokens", 4, *flags)
    assert code == 0 and out.startswith(PROMPT)
    warnings = [line for line in err.splitlines() if line.startswith("archkit: warning: ")]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "greedy decoding" in warnings[0], err


def test_cli_greedy_and_temperature_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--arch", "llama", "--prompt", "x", "--greedy", "--temperature", "0.5"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_inspect_prints_the_generation_defaults(tmp_path, capsys):
    assert main(["inspect", str(demo_with(tmp_path, QWEN3))]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("generation"))
    assert "sampling by default" in line and "temperature=0.6" in line and "top_k=20" in line and "top_p=0.95" in line
    assert main(["inspect", str(demo_with(tmp_path / "b", {"temperature": 0.7}))]) == 0
    assert "greedy by default" in capsys.readouterr().out


# -- special token ids outside the vocabulary -------------------------------------------------------
def test_ids_outside_the_vocabulary_load_ignored_with_one_warning(tmp_path, caplog):
    cfg = {**LLAMA_CONFIG, "eos_token_id": [2, -1, 50256], "bos_token_id": 50256}
    p = write_checkpoint(tmp_path / "ckpt", cfg, tokenizer=True, generation_config={"eos_token_id": [3, 300]})
    with caplog.at_level(logging.WARNING, logger="archkit"):
        model = core.load(p, device="cpu", quiet=True)
        core.load(p, device="cpu", quiet=True)  # once: the second load says nothing new
    assert model.eos_token_ids == (3, 2) and model.config.bos_token_id is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "archkit"]
    assert len(msgs) == 2, msgs
    assert "config.json: eos_token_id -1, eos_token_id 50256, bos_token_id 50256 outside the vocabulary [0, 256)" in msgs[0]
    assert "generation_config.json: eos_token_id 300 outside the vocabulary [0, 256)" in msgs[1]
    assert model.generate([1, 2, 3], max_new_tokens=4)  # and it generates


@needs_torch
def test_gpt2config_defaults_on_a_small_vocab_load_like_transformers(tmp_path, capsys):
    """GPT2Config's bos/eos default 50256; a 256-token test model saved by transformers keeps it."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=1,
                                                              n_head=2, initializer_range=0.15)).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 50256
    model = core.load(tmp_path, device="cpu", quiet=True)
    assert model.eos_token_ids == ()
    with torch.no_grad():
        want = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 3:].tolist()
    assert model.generate([1, 2, 3], max_new_tokens=6) == want
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--device", "cpu", "--prompt", "x"]) == 1  # no tokenizer: that error only
    err = capsys.readouterr().err
    assert "tokenizer.json not found" in err and "outside the vocabulary" not in err  # warned once already, above


# -- logging ------------------------------------------------------------------------------------
def test_device_auto_is_logged_not_printed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="archkit"):
        model = core.load(demo_checkpoint("llama"), device="auto")
    if model.device != "cpu":
        pytest.skip("a GPU is present: auto picks cuda")
    assert any(r.getMessage().startswith("device auto → cpu") for r in caplog.records)
    assert capsys.readouterr().err == ""  # library code prints nothing; logging's defaults hide INFO
    assert main(["generate", "--arch", "llama", "--prompt", "x", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().err.startswith("archkit: device auto → cpu (")  # the CLI shows the logger
