"""The host registry: every family spec that plugins registered, and every plugin that broke.

Built-in families (plugins.gpt2, plugins.llama, plugins.qwen3) are registered by the host through the
same hook as outside plugins, which are found through the entry-point group "archkit". A plugin that
fails to import, raises in its hook, registers an invalid spec or a duplicate name is recorded as
broken, by name, and the others keep working.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable, Iterator

import attrs
import pluggy

from . import hookspecs
from .config import BOOL_FIELDS, CONFIG_FIELDS
from .errors import UnknownArchitectureError
from .spec import ModelSpec, validate_spec
from .weights import check_spec

BUILTINS = ("plugins.gpt2", "plugins.llama", "plugins.qwen3", "plugins.qwen2", "plugins.mistral", "plugins.phi3",
            "plugins.gemma2", "plugins.gpt_neox", "plugins.phi", "plugins.mixtral", "plugins.qwen3_moe")
GROUP = "archkit"
ALLOW_ENV = "ARCHKIT_PLUGINS"  # comma-separated plugin names to load; unset = all


@attrs.frozen
class Entry:
    """A registered family: its spec and who provided it."""

    spec: ModelSpec
    plugin: str  # plugin name (module or entry-point name)
    distribution: str | None = None
    version: str | None = None


@attrs.frozen
class BrokenPlugin:
    """A plugin that could not contribute, and why."""

    name: str
    error: str
    distribution: str | None = None


class Registry:
    """Families by name (a small class over a dict of frozen Entry records)."""

    def __init__(self, entries: dict[str, Entry] | None = None, broken: Iterable[BrokenPlugin] = ()):
        self._entries = dict(entries or {})
        self.broken = list(broken)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownArchitectureError(
                f"unknown architecture {name!r}; registered: {', '.join(self) or 'none'}{self.broken_hint()}") from None

    def broken_hint(self) -> str:
        """'; broken plugins: name (why), ...' for error messages, or '' when none is broken."""
        return "; broken plugins: " + ", ".join(f"{b.name} ({b.error})" for b in self.broken) if self.broken else ""

    def entries(self) -> list[Entry]:
        """All entries, sorted by family name."""
        return [self._entries[n] for n in self]

    def __repr__(self):
        broken = f", broken={[b.name for b in self.broken]}" if self.broken else ""
        return f"<Registry {list(self)}{broken}>"

    @classmethod
    def discover(cls, builtins: Iterable[str] = BUILTINS, entry_points: bool = True,
                 allow: Iterable[str] | None = None, extra: Iterable[object] = ()) -> "Registry":
        """Load built-ins, entry-point plugins and `extra` plugin objects; see the module docstring.

        allow: plugin names to load (default: $ARCHKIT_PLUGINS if set, else all).
        """
        if allow is None and os.environ.get(ALLOW_ENV):
            allow = [a.strip() for a in os.environ[ALLOW_ENV].split(",") if a.strip()]
        allowed = None if allow is None else set(allow)
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        broken: list[BrokenPlugin] = []
        dists: dict[str, tuple[str | None, str | None]] = {}

        def add(name, load, dist=(None, None)):
            if allowed is not None and name not in allowed:
                return
            dists[name] = dist
            try:
                pm.register(load(), name=name)
            except (Exception, SystemExit) as e:  # a plugin's own import error is its problem, not the host's
                broken.append(BrokenPlugin(name, _one_line(f"failed to load: {type(e).__name__}: {e}"), dist[0]))

        for mod in builtins:
            add(mod.rsplit(".", 1)[-1], functools.partial(importlib.import_module, mod), ("archkit", _version("archkit")))
        if entry_points:
            for ep in md.entry_points(group=GROUP):
                dist = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
                if pm.has_plugin(ep.name) or ep.name in dists:
                    broken.append(BrokenPlugin(ep.name, "plugin name already taken by another plugin", dist[0]))
                    continue
                add(ep.name, ep.load, dist)
        for obj in extra:
            add(getattr(obj, "__name__", repr(obj)).rsplit(".", 1)[-1], lambda o=obj: o)
        entries: dict[str, Entry] = {}
        impls = pm.hook.archkit_register_architectures.get_hookimpls()
        for impl in impls:
            _collect(impl.plugin_name, impl.function, dists.get(impl.plugin_name, (None, None)), entries, broken)
        hooked = {impl.plugin_name for impl in impls}
        for name in dists:  # loaded, but never registers anything: say so rather than skip it silently
            if pm.has_plugin(name) and name not in hooked:
                broken.append(BrokenPlugin(name, "has no archkit_register_architectures hook (missing @core.hookimpl?)",
                                           dists[name][0]))
        for name in sorted((allowed or set()) - set(dists) - {b.name for b in broken}):
            broken.append(BrokenPlugin(name, f"is in the plugin allow-list (${ALLOW_ENV} or allow=) but no installed "
                                             f"plugin has that name"))
        return cls(entries, broken)


def _collect(plugin: str, hook, dist, entries: dict[str, Entry], broken: list[BrokenPlugin]) -> None:
    """Run one plugin's hook in isolation, validating each spec it registers."""
    problems: list[str] = []
    mine: dict[str, Entry] = {}

    def register(spec):
        bad = validate_spec(spec, CONFIG_FIELDS, BOOL_FIELDS)
        if not bad:
            bad = check_spec(spec)
        if bad:
            problems.append(f"invalid spec {getattr(spec, 'name', '?')!r}: " + "; ".join(bad))
        elif spec.name in entries or spec.name in mine:
            other = (entries.get(spec.name) or mine[spec.name]).plugin
            problems.append(f"duplicate architecture {spec.name!r} (already registered by plugin {other!r})")
        else:
            mine[spec.name] = Entry(spec, plugin, *dist)

    try:
        hook(register=register)
    except (Exception, SystemExit) as e:
        problems.append(f"raised in archkit_register_architectures: {type(e).__name__}: {e}")
    if not mine and not problems:
        problems.append("its archkit_register_architectures hook registered no architecture")
    if problems:  # all or nothing: a plugin that broke contributes no family, not half of its families
        broken.append(BrokenPlugin(plugin, _one_line("; ".join(problems)), dist[0]))
    else:
        entries.update(mine)


def _one_line(text: str) -> str:
    """Whitespace runs (pluggy's messages span lines) as single spaces, so errors stay one line."""
    return " ".join(text.split())


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry (discovered once)."""
    return Registry.discover()
