"""The archkit command's additions: loading progress, streamed generate output, --stop escapes, --help examples."""

import io
import shutil

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


def test_progress_bar_in_a_log_prints_quarters_and_skips_small_checkpoints(sharded):
    log = io.StringIO()
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(log, log_bytes=0))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("loading   0%") and lines[-1].startswith("loading 100%") and len(lines) <= 5
    assert "\r" not in log.getvalue()
    quiet, tty = io.StringIO(), Terminal()
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(quiet))
    core.load(sharded, device="cpu", quiet=True, progress=ProgressBar(tty))  # under min_bytes: no bar either
    assert quiet.getvalue() == tty.getvalue() == ""


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
