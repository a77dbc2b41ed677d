"""examples/plugin-template installs from a fresh virtual environment as its README says.

The walk-through itself (python3 -m venv, pip install -e ../.., pip install -e ., archkit list) runs in a fresh venv
(~15 s, from the package index CI installs from); the static checks say what broke when it fails: a requirement that
only PyPI could meet, an unpinned torch, steps in the wrong order.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"


def pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def requirements(deps) -> dict[str, Requirement]:
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def test_archkit_requirement_is_met_by_the_checkout():
    archkit = pyproject(ROOT)["project"]
    req = requirements(pyproject(TEMPLATE)["project"]["dependencies"])["archkit"]
    assert req.url is None or req.url.startswith("file:"), req  # never a location only PyPI or the network has
    assert req.specifier.contains(archkit["version"], prereleases=True), (str(req), archkit["version"])


def test_test_extra_pins_torch_as_archkit_does():
    ours = requirements(pyproject(ROOT)["project"]["optional-dependencies"]["test"])["torch"]
    theirs = requirements(pyproject(TEMPLATE)["project"]["optional-dependencies"]["test"])
    assert str(theirs["torch"].specifier) == str(ours.specifier) == "==2.13.0"
    imported = {m for f in (TEMPLATE / "tests").glob("*.py")
                for m in re.findall(r"^\s*(?:import|from) (\w+)", f.read_text(), re.M)}
    assert {"pytest", "torch", "transformers"} & imported <= set(theirs)  # what its tests import is in the extra


def test_entry_point_names_the_shipped_module():
    t = pyproject(TEMPLATE)
    module = t["project"]["entry-points"]["archkit"]["seed_oss"]
    assert module in t["tool"]["setuptools"]["py-modules"] and (TEMPLATE / f"{module}.py").is_file()


def test_readme_installs_archkit_from_the_checkout_first():
    readme = (TEMPLATE / "README.md").read_text()
    block = readme.split("```sh", 1)[1].split("```", 1)[0]
    steps = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    first = next(i for i, s in enumerate(steps) if s.startswith("pip install -e ") and "../.." in s)
    plugin = steps.index("pip install -e .")
    assert steps[0].startswith("python3 -m venv") and first < plugin
    checkout = (TEMPLATE / steps[first].split()[-1]).resolve()
    assert pyproject(checkout)["project"]["name"] == "archkit"


def test_the_readme_walk_through_in_a_fresh_venv(tmp_path):
    """The template README's steps, really run: a fresh venv (no site packages), archkit installed from this
    checkout, then the template; `archkit list` shows the family. Needs the package index CI installs from
    (archkit's runtime dependencies); tens of seconds."""
    import os
    import subprocess
    import sys

    venv = tmp_path / "venv"
    run = lambda *a, **kw: subprocess.run(a, capture_output=True, text=True, timeout=300, **kw)  # noqa: E731
    r = run(sys.executable, "-m", "venv", str(venv))
    assert r.returncode == 0, r.stderr
    pip, env = venv / "bin" / "pip", {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("ARCHKIT_PLUGINS", None)
    r = run(str(pip), "install", "-q", "-e", str(ROOT), env=env)  # README: pip install -e ../..
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(str(pip), "install", "-q", "-e", ".", cwd=TEMPLATE, env=env)  # README: pip install -e .
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(str(venv / "bin" / "archkit"), "list", env=env)
    assert r.returncode == 0 and "seed_oss" in r.stdout, (r.stdout, r.stderr)
