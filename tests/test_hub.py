"""Hub ids ("owner/name") through huggingface_hub: a cache that huggingface_hub itself wrote, used offline.

A small HTTP server plays the Hugging Face Hub (the three routes snapshot_download calls: repo info, the
file tree, and resolve) for one repository holding a copy of the llama demo checkpoint plus a file archkit does
not read. `archkit inspect owner/name` against it downloads through the real snapshot_download into a
temporary HF_HUB_CACHE, so the cache layout (blobs, snapshots/<commit>, refs/main, the tree listing) is
huggingface_hub's own; everything after that runs with HF_HUB_OFFLINE=1 and no server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

import core
from core.demo import demo_checkpoint
from core.errors import CheckpointError
from core.hub import is_hub_id, resolve
from fakeplugins import assert_one_line_error, cli

hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub (the `hub` extra) is not installed")

REPO = "archkit-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_READ = "pytorch_model.bin"  # archkit never reads it, so it must not be downloaded


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers snapshot_download's requests for REPO at COMMIT from `files` (path → bytes); counts downloads."""

    files: dict[str, bytes] = {}
    fetched: list[str] = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, body: bytes, headers: dict, status: int = 200, with_body: bool = True):
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def _route(self, with_body: bool):
        path = self.path.split("?", 1)[0]
        api = f"/api/models/{REPO}/"
        if path.startswith(api + "revision/"):
            return self._send(json.dumps({"id": REPO, "sha": COMMIT, "siblings": [
                {"rfilename": f} for f in self.files]}).encode(), {"Content-Type": "application/json"})
        if path.startswith(api + "tree/"):
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in self.files.items()]
            return self._send(json.dumps(tree).encode(), {"Content-Type": "application/json"})
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix):].split("/", 1)[1]
            if name in self.files:
                body = self.files[name]
                if with_body:
                    FakeHub.fetched.append(name)
                return self._send(body, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'},
                                  with_body=with_body)
        self._send(b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, status=404,
                   with_body=with_body)

    def do_GET(self):
        self._route(True)

    def do_HEAD(self):
        self._route(False)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A temporary HF_HUB_CACHE that huggingface_hub filled by downloading REPO from the fake Hub."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    src = demo_checkpoint("llama")
    FakeHub.files = {f.name: f.read_bytes() for f in sorted(src.iterdir())} | {NOT_READ: b"\0" * 64}
    FakeHub.fetched = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_CACHE": str(cache),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_TOKEN": "", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        r = cli("inspect", REPO, env=env)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert "family       llama" in r.stdout and f"snapshots/{COMMIT}" in r.stdout
    assert sorted(FakeHub.fetched) == sorted(set(FakeHub.files) - {NOT_READ})
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 with the cache above (huggingface_hub read the variables at import: patch its constants)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_the_cache_is_huggingface_hubs_own_layout(hub_cache):
    info = hub.scan_cache_dir(hub_cache)
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    assert (hub_cache / "models--archkit-test--tiny-llama" / "refs" / "main").read_text() == COMMIT
    snapshot = hub_cache / "models--archkit-test--tiny-llama" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_symlink() and not (snapshot / NOT_READ).exists()


def test_load_a_hub_id_offline_equals_loading_the_directory(offline):
    model = core.load(REPO, device="cpu", quiet=True)
    local = core.load(demo_checkpoint("llama"), device="cpu", quiet=True)
    assert model.path == offline / "models--archkit-test--tiny-llama" / "snapshots" / COMMIT
    ids = local.tokenizer.encode("Return the number of")
    assert model.generate(ids, max_new_tokens=8) == local.generate(ids, max_new_tokens=8)
    assert core.load(REPO, device="cpu", quiet=True, revision=COMMIT).path == model.path


def test_cli_generate_a_hub_id_offline(offline, capsys):
    from core.cli import main

    assert main(["generate", REPO, "--device", "cpu", "--prompt", "Return the number of", "--max-new-tokens", "6"]) == 0
    want = core.load(demo_checkpoint("llama"), device="cpu", quiet=True).generate_text(
        "Return the number of", max_new_tokens=6)
    assert capsys.readouterr().out == "Return the number of" + want + "\n"


def test_not_cached_offline_is_one_line_saying_what_to_run(offline, tmp_path):
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE is set; run "
                                              r"`hf download archkit-test/absent`"):
        core.load("archkit-test/absent", device="cpu", quiet=True)
    with pytest.raises(CheckpointError, match=r"at revision 'v9'.*`hf download archkit-test/tiny-llama --revision v9`"):
        core.load(REPO, device="cpu", quiet=True, revision="v9")
    r = cli("generate", "archkit-test/absent", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert_one_line_error(r, "archkit-test/absent", "hf download archkit-test/absent")


def test_incomplete_snapshot_says_so(offline, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    shutil.copytree(offline, cache, symlinks=True)
    (cache / "models--archkit-test--tiny-llama" / "snapshots" / COMMIT / "tokenizer.json").unlink()
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointError, match="incomplete; run `hf download archkit-test/tiny-llama`"):
        core.load(REPO, device="cpu", quiet=True)


def test_a_local_directory_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_checkpoint("gpt2"), tmp_path / REPO)
    assert core.load(REPO, device="cpu", quiet=True).spec.name == "gpt2"  # the cache holds a llama under that id
    with pytest.raises(CheckpointError, match="revision='main' applies to hub ids"):
        resolve(REPO, revision="main")


def test_what_counts_as_a_hub_id():
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("meta-llama/Llama-3.2-1B") and is_hub_id("a_b/c.d")
    for s in ("gpt2", "./Qwen/Qwen3", "/abs/path", "a/b/c", "a/../b", "-a/b", "a/.b", "a--b/c", Path("a/b")):
        assert not is_hub_id(s), s


def test_without_huggingface_hub_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now raises ImportError
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory; .*archkit\[hub\]"):
        core.load("Qwen/Qwen3-0.6B", device="cpu", quiet=True)


def test_the_hub_extra_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("huggingface_hub") for d in extras["hub"])
    assert any(d.startswith("huggingface_hub") for d in extras["test"])  # so CI runs these tests
