"""Out-of-tree plugins made on the fly: a module plus a .dist-info whose entry point archkit discovers.

Putting the folder on sys.path (or PYTHONPATH for a subprocess) is all it takes for
importlib.metadata, and so for Registry.discover and the `archkit` command, to see the plugin as if it
had been pip-installed. Each source below is one way a plugin can be broken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A valid spec under a new name that claims exactly what the built-in llama plugin claims.
CLONE = """
    import attrs
    from core import hookimpl
    from plugins.llama import SPEC

    @hookimpl
    def archkit_register_architectures(register):
        register(attrs.evolve(SPEC, name="{name}"))
"""

IMPORT_FAILS = """
    import archkit_this_module_does_not_exist  # noqa: F401
"""

HOOK_RAISES = """
    from core import hookimpl

    @hookimpl
    def archkit_register_architectures(register):
        raise RuntimeError("the plugin's own bug")
"""

# One spec with a setting in ModelSpec's field `{field}` that the host must refuse.
INVALID = """
    import attrs
    from core import Detection, W, hookimpl
    from plugins.llama import SPEC

    @hookimpl
    def archkit_register_architectures(register):
        register(attrs.evolve(SPEC, name="{name}", {field}={value}))
"""

# A detection rule that matches every checkpoint: a str whose == is always true.
CLAIMS_ALL = """
    import attrs
    from core import Detection, hookimpl
    from plugins.llama import SPEC

    class Anything(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            return True

    @hookimpl
    def archkit_register_architectures(register):
        register(attrs.evolve(SPEC, name="{name}", detection=Detection(architectures=(Anything("*"),),
                                                                      model_types=(Anything("*"),))))
"""

NO_HOOK = """
    from plugins.llama import SPEC

    def archkit_register_architectures(register):  # forgot @hookimpl
        register(SPEC)
"""

REGISTERS_THEN_RAISES = """
    import attrs
    from core import hookimpl
    from plugins.llama import SPEC

    @hookimpl
    def archkit_register_architectures(register):
        register(attrs.evolve(SPEC, name="{name}", detection=attrs.evolve(SPEC.detection, architectures=("HalfForCausalLM",),
                                                                          model_types=("half",))))
        raise ValueError("second spec failed")
"""

# A BaseException that is neither KeyboardInterrupt nor SystemExit, at import and in the hook (issue 17).
ABORTS_AT_IMPORT = """
    class PluginAbort(BaseException):
        pass

    raise PluginAbort("a BaseException at import")
"""

ABORTS_IN_HOOK = """
    from core import hookimpl

    class PluginAbort(BaseException):
        pass

    @hookimpl
    def archkit_register_architectures(register):
        raise PluginAbort("a BaseException in the hook")
"""

# A valid spec under a built-in family's name, registered from a hook asking to run last (issue 17).
HIJACK = """
    import attrs
    from core import hookimpl
    from plugins.llama import SPEC

    @hookimpl(trylast=True)
    def archkit_register_architectures(register):
        register(attrs.evolve(SPEC, name="{name}", description="hijacked"))
"""

EXITS = """
    import sys
    sys.exit("a plugin that calls sys.exit at import")
"""


def install(site: Path, name: str, source: str, spec_name: str | None = None, module: str | None = None, **fmt) -> Path:
    """Write plugin `name` (entry point in group "archkit") into folder `site`; return `site`.

    The source's {name} (the spec it registers) is `spec_name`, by default the plugin's name; the module
    and distribution are named after `module`, by default the plugin's name too.
    """
    site.mkdir(parents=True, exist_ok=True)
    mod = "archkit_fake_" + (module or name).replace("-", "_")
    (site / f"{mod}.py").write_text(textwrap.dedent(source.format(name=spec_name or name, **fmt)))
    info = site / f"{mod}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[archkit]\n{name} = {mod}\n")
    return site


def cli(*args, site: Path | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m core ARGS` (with `site` on PYTHONPATH) and return the finished process."""
    e = dict(os.environ)
    e.pop("ARCHKIT_PLUGINS", None)
    if site is not None:
        e["PYTHONPATH"] = os.pathsep.join([str(site)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=REPO, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI failed with exit code 1 and exactly one stderr line `archkit: error: ...` holding every fragment."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("archkit: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
