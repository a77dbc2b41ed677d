"""The archkit command's additions: loading progress, streamed generate output, --stop escapes, --help examples."""

import io
import shutil
import sys

import pytest

import core
from core.checkpoint import Checkpoint
from core.cli import ProgressBar, _parser, main
from core.demo import DATA, demo_checkpoint
from core.registry import default_registry
from core.synth import make_config, write_checkpoint


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A random llama checkpoint in 4+ safetensors shards, with the demo tokenizer."""
    spec = default_registry()["llama"].spec
    cfg = make_config(spec, vocab_size=4096, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                      max_position_embeddings=64)
    d = write_checkpoint(spec, cfg, tmp_path_factory.mktemp("sharded"), dtype="float16", shard_bytes=200_000)
    shutil.copy(DATA / "demo_tokenizer.json", d / "tokenizer.json")
    return d


def test_load_reports_every_byte_of_every_shard(sharded):
    calls = []
    core.load(sharded, device="cpu", quiet=True, progress=lambda *a: calls.append(a))
    ckpt = Checkpoint(sharded)
    total = sum(t.nbytes for t in ckpt.tensors.values())
    assert len(ckpt.files) >= 4
    assert calls[0] == (0, total, 1, len(ckpt.files))
    assert len(calls) == len(ckpt.tensors) + 1  # once before, once per tensor read
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][0] == total
    assert {c[2] for c in calls[1:]} == set(range(1, len(ckpt.files) + 1)) and {c[3] for c in calls} == {len(ckpt.files)}


def test_progress_bar_on_a_terminal_redraws_one_line(sharded):
    out = Terminal()
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(out, min_bytes=0))
    text = out.getvalue()
    assert text.startswith("\rloading   0%") and text.endswith("\n") and text.count("\n") == 1
    assert "loading 100% |" in text and "file " in text


def test_progress_bar_in_a_log_prints_a_line_per_tenth_and_skips_small_checkpoints(sharded):
    log = io.StringIO()
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(log, min_bytes=0))
    lines = log.getvalue().splitlines()
    percents = [int(line.split()[1].rstrip("%")) for line in lines]
    assert percents == sorted(set(percents)) and percents[0] == 0 and percents[-1] == 100, lines
    assert all(p % 10 == 0 for p in percents) and len(percents) >= 5  # 4+ shards: most tenths get their line
    assert "\r" not in log.getvalue() and "file " in lines[-1]
    quiet, tty = io.StringIO(), Terminal()
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(quiet))
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(tty))  # under min_bytes: no bar either
    assert quiet.getvalue() == tty.getvalue() == ""


def test_readme_promises_what_the_progress_bar_does():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert ProgressBar().min_bytes == 64 << 20
    assert "Checkpoints of 64 MB or more show a progress bar on stderr" in readme and "a line at each 10%" in readme


def test_generate_prints_prompt_then_the_streamed_continuation(capsys):
    model = core.load(demo_checkpoint("gpt2"), device="cpu", quiet=True)
    want = model.generate_text("Return the number of", max_new_tokens=16, stop=["\n\n"])
    assert main(["generate", "--arch", "gpt2", "--device", "cpu", "--prompt", "Return the number of",
                 "--max-new-tokens", "16", "--stop", r"\n\n"]) == 0
    assert capsys.readouterr().out == "Return the number of" + want + "\n"


@pytest.mark.parametrize("cmd", ["generate", "chat", "inspect", "list", "bench"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([cmd, "--help"])
    out = capsys.readouterr().out
    assert "example" in out and f"archkit {cmd}" in out


def test_unknown_family_is_a_one_line_error(capsys):
    assert main(["generate", "--arch", "no-such-family", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("archkit: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["bench", "--device", "cuda", "--model", "gpt2-124m"],
                                  ["generate", "--arch", "gpt2", "--prompt", "hi", "--device", "cuda"]])
def test_cuda_without_a_gpu_is_a_one_line_error(argv, capsys):
    from core.load import cuda_available

    if cuda_available()[0]:
        pytest.skip("a GPU is present here: the commands would run")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("archkit: error: device 'cuda' is not usable")


def test_compare_hf_without_transformers_is_a_one_line_error(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["bench", "--device", "cpu", "--model", "gpt2-124m", "--compare-hf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["archkit: error: --compare-hf needs transformers installed (pip install 'archkit[test]')"]


# -- validation before output, usage errors, where the prompt comes from ----------------------------
GEN = ["generate", "--arch", "gpt2", "--device", "cpu", "--max-new-tokens", "8"]


@pytest.mark.parametrize("flags,fragment", [(["--temperature", "-1"], "temperature=-1"),
                                            (["--top-p", "1.5"], "top_p=1.5"),
                                            (["--top-k", "-2"], "top_k=-2"),
                                            (["--presence-penalty", "3"], "presence_penalty=3"),
                                            (["--min-p", "2"], "min_p=2"),
                                            (["--max-new-tokens", "100000"], "context")])
def test_bad_values_fail_before_anything_is_printed(flags, fragment, capsys):
    assert main([*GEN, "--prompt", "hello", *flags]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # the prompt is not echoed first
    lines = [line for line in err.splitlines() if not line.startswith("archkit: device")]
    assert len(lines) == 1 and lines[0].startswith("archkit: error: ") and fragment in lines[0], err


@pytest.mark.parametrize("argv,usage,hint", [
    (["generate", "--arch", "gpt2", "--promt", "hi"], "usage: archkit generate", "did you mean --prompt?"),
    (["generate", "--arch", "gpt2", "--prompt", "hi", "--temprature=0.5"], "usage: archkit generate",
     "did you mean --temperature?"),
    (["chat", "--arch", "llama", "--sytem", "x"], "usage: archkit chat", "did you mean --system?"),
    (["inspect", "ckpt", "--arhc", "llama"], "usage: archkit inspect", "did you mean --arch?"),
    (["generate", "--arch", "gpt2"], "usage: archkit generate", "one of the arguments --prompt --prompt-file is required"),
    (["generate", "--prompt", "hi"], "usage: archkit generate", "give a checkpoint PATH"),
    (["chat"], "usage: archkit chat", "or --arch to use that family's embedded demo model"),
])
def test_usage_errors_show_the_subcommand_and_the_closest_flag(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and hint in err.splitlines()[-1], err
    assert "COMMAND" not in err  # not the top-level usage


def test_prompt_from_stdin_and_from_a_file(tmp_path, monkeypatch, capsys):
    text = "def read_file(path):\n    "
    want = core.load(demo_checkpoint("gpt2"), device="cpu", quiet=True).generate_text(text, max_new_tokens=8)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))  # the newline echo/heredocs add is dropped
    assert main([*GEN, "--prompt", "-"]) == 0
    assert capsys.readouterr().out == text + want + "\n"
    (tmp_path / "p.txt").write_text(text + "\n", encoding="utf-8")
    assert main([*GEN, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == text + want + "\n"
    with pytest.raises(SystemExit) as e:
        main([*GEN, "--prompt-file", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--prompt-file: cannot read" in err and "missing.txt" in err
    with pytest.raises(SystemExit):
        main([*GEN, "--prompt", "x", "--prompt-file", str(tmp_path / "p.txt")])  # one or the other


def test_min_p_and_openai_penalties_pass_through(capsys):
    model = core.load(demo_checkpoint("gpt2"), device="cpu", quiet=True)
    kw = dict(temperature=0.9, min_p=0.05, presence_penalty=1.5, frequency_penalty=0.7, seed=2, max_new_tokens=12)
    want = model.generate_text("Return the number of", **kw)
    assert want != model.generate_text("Return the number of", **{**kw, "presence_penalty": 0, "frequency_penalty": 0})
    assert main(["generate", "--arch", "gpt2", "--device", "cpu", "--prompt", "Return the number of", "--temperature",
                 "0.9", "--min-p", "0.05", "--presence-penalty", "1.5", "--frequency-penalty", "0.7", "--seed", "2",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "Return the number of" + want + "\n"


def test_logprobs_lists_each_token_with_its_alternatives(capsys):
    model = core.load(demo_checkpoint("gpt2"), device="cpu", quiet=True)
    ids = model.tokenizer.encode("Return the number of")
    new = model.generate(ids, max_new_tokens=6, logprobs=3)
    assert main([*GEN[:-1], "6", "--prompt", "Return the number of", "--logprobs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = model.tokenizer.decode([t.token for t in new])
    assert lines[0] == "Return the number of" + text.split("\n")[0] and lines[-7].startswith("token")
    for line, t in zip(lines[-6:], new):
        assert line.startswith(repr(model.tokenizer.decode([t.token]))) and f"{t.logprob:.4f}" in line
        assert len(t.top) == 3 and all(f"{lp:.4f}" in line for _, lp in t.top)
