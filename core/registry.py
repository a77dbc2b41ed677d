"""The host registry: every family spec that plugins registered, and every plugin that broke.

Built-in families (plugins.gpt2, plugins.llama, plugins.qwen3) are registered by the host through the
same hook as outside plugins, which are found through the entry-point group "archkit". A plugin that
fails to import, raises (any exception but KeyboardInterrupt) in its import or hook, registers an invalid
spec or a duplicate name is recorded as broken, by name, and the others keep working. Built-in plugin and
family names are reserved: an outside plugin claiming one is the broken one, whatever its hook order; and
an entry-point name that two distributions provide loads neither until the allow-list picks one
(`distribution:name`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
import re
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
ALLOW_ENV = "ARCHKIT_PLUGINS"  # comma-separated `name` or `distribution:name`; unset = all, empty = built-ins only


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

        allow: plugins to load, each a plugin name or `distribution:entry-point` (default: $ARCHKIT_PLUGINS if
        set, else all); a list naming no plugin (ARCHKIT_PLUGINS="") loads the built-ins and no outside plugin.
        """
        if allow is None and ALLOW_ENV in os.environ:
            allow = os.environ[ALLOW_ENV].split(",")
        sel = _Selection(allow)
        builtins = tuple(builtins)
        reserved = {mod.rsplit(".", 1)[-1]: mod for mod in builtins}  # plugin and family names outsiders cannot take
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        broken: list[BrokenPlugin] = []
        dists: dict[str, tuple[str | None, str | None]] = {}  # loaded plugin name → (distribution, version)

        def add(name, load, dist=(None, None)):
            dists[name] = dist
            try:
                pm.register(load(), name=name)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a plugin's own failure is its problem, not the host's (SystemExit too)
                broken.append(BrokenPlugin(name, _one_line(f"failed to load: {_why(e)}"), dist[0]))

        for mod in builtins:
            name = mod.rsplit(".", 1)[-1]
            if sel.allows(name, "archkit"):
                add(name, functools.partial(importlib.import_module, mod), ("archkit", _version("archkit")))
        for name, eps in (_entry_points() if entry_points else {}).items():
            chosen = [ep for ep in eps if sel.allows(name, _dist(ep)[0])]
            chosen = [ep for ep in chosen if sel.picks(name, _dist(ep)[0])] or chosen  # `dist:name` beats `name`
            if not chosen:
                continue
            dist = _dist(chosen[0])
            if name in reserved or name in dists:
                owner = f"the built-in plugin {reserved[name]!r}" if name in reserved else "another plugin"
                broken.append(BrokenPlugin(name, f"plugin name already taken by {owner}", dist[0]))
            elif len(chosen) > 1:  # whichever came first on sys.path would win: load none, say how to pick
                who = ", ".join(f"{d} {v}" for d, v in map(_dist, chosen))
                broken.append(BrokenPlugin(name, f"entry-point name {name!r} is provided by {len(chosen)} distributions "
                                                 f"({who}); none was loaded: choose one with ${ALLOW_ENV}="
                                                 f"'distribution:{name}'", None))
            else:
                add(name, chosen[0].load, dist)
        for obj in extra:
            name = getattr(obj, "__name__", repr(obj)).rsplit(".", 1)[-1]
            if sel.allows(name, None):
                add(name, lambda o=obj: o)
        entries: dict[str, Entry] = {}
        order = {name: i for i, name in enumerate(dists)}
        own = {name for name in reserved if name in dists}
        # Built-ins first, then the others in the order they were found: never pluggy's tryfirst/trylast order,
        # which a plugin chooses, so no plugin can run before a built-in and take its family name.
        impls = sorted(pm.hook.archkit_register_architectures.get_hookimpls(),
                       key=lambda impl: (impl.plugin_name not in own, order.get(impl.plugin_name, len(order))))
        for impl in impls:
            outsider = impl.plugin_name not in own
            _collect(impl.plugin_name, impl.function, dists.get(impl.plugin_name, (None, None)), entries, broken,
                     reserved if outsider else {})
        hooked = {impl.plugin_name for impl in impls}
        for name in dists:  # loaded, but never registers anything: say so rather than skip it silently
            if pm.has_plugin(name) and name not in hooked:
                broken.append(BrokenPlugin(name, "has no archkit_register_architectures hook (missing @core.hookimpl?)",
                                           dists[name][0]))
        for item in sel.unused({b.name for b in broken}):
            broken.append(BrokenPlugin(item, f"is in the plugin allow-list (${ALLOW_ENV} or allow=) but no installed "
                                             f"plugin has that name"))
        return cls(entries, broken)


class _Selection:
    """The allow-list: None loads every plugin; otherwise the plugins it names (`name` or `distribution:name`),
    and the built-ins too when it names none at all (ARCHKIT_PLUGINS="" means no outside plugin, not nothing)."""

    def __init__(self, allow: Iterable[str] | None):
        self.items = None if allow is None else [a.strip() for a in allow if isinstance(a, str) and a.strip()]
        self.used: set[str] = set()

    def allows(self, name: str, dist: str | None) -> bool:
        if self.items is None:
            return True
        if not self.items:
            return dist == "archkit"
        hits = [a for a in self.items if a == name or self._names(a, name, dist)]
        self.used.update(hits)
        return bool(hits)

    def picks(self, name: str, dist: str | None) -> bool:
        """Whether an item names entry point `name` of distribution `dist` explicitly."""
        return any(self._names(a, name, dist) for a in self.items or ())

    @staticmethod
    def _names(item: str, name: str, dist: str | None) -> bool:
        d, colon, n = item.rpartition(":")
        return bool(colon) and dist is not None and n.strip() == name and _normalize(d) == _normalize(dist)

    def unused(self, broken: set[str]) -> list[str]:
        """Allow-list items that matched no plugin (named plugins that broke are reported already)."""
        return sorted(a for a in set(self.items or ()) - self.used if a.rpartition(":")[2].strip() not in broken)


def _entry_points() -> dict[str, list]:
    """Entry points of group GROUP by name, in discovery order; several per name when distributions clash."""
    out: dict[str, list] = {}
    for ep in md.entry_points(group=GROUP):
        if not any(_dist(o) == _dist(ep) and o.value == ep.value for o in out.get(ep.name, ())):
            out.setdefault(ep.name, []).append(ep)
    return out


def _dist(ep) -> tuple[str | None, str | None]:
    return (ep.dist.name, ep.dist.version) if ep.dist else (None, None)


def _normalize(dist: str) -> str:
    """A distribution name as pip compares them (PEP 503): case and runs of - _ . do not matter."""
    return re.sub(r"[-_.]+", "-", dist.strip()).lower()


def _collect(plugin: str, hook, dist, entries: dict[str, Entry], broken: list[BrokenPlugin],
             reserved: dict[str, str]) -> None:
    """Run one plugin's hook in isolation, validating each spec it registers.

    reserved: family name → built-in module that owns it; an outside plugin registering one of them is broken,
    whether or not that built-in was loaded.
    """
    problems: list[str] = []
    mine: dict[str, Entry] = {}

    def register(spec):
        bad = validate_spec(spec, CONFIG_FIELDS, BOOL_FIELDS)
        if not bad:
            bad = check_spec(spec)
        if bad:
            problems.append(f"invalid spec {_cut(getattr(spec, 'name', '?'))}: " + "; ".join(bad))
        elif spec.name in entries or spec.name in mine:
            other = (entries.get(spec.name) or mine[spec.name]).plugin
            taken = "; built-in family names are reserved" if spec.name in reserved else ""
            problems.append(f"duplicate architecture {spec.name!r} (already registered by plugin {other!r}){taken}")
        elif spec.name in reserved:
            problems.append(f"architecture name {spec.name!r} is reserved for the built-in plugin "
                            f"{reserved[spec.name]!r}")
        else:
            mine[spec.name] = Entry(spec, plugin, *dist)

    try:
        hook(register=register)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit and odd BaseException subclasses too: the plugin broke, not the host
        problems.append(f"raised in archkit_register_architectures: {_why(e)}")
    if not mine and not problems:
        problems.append("its archkit_register_architectures hook registered no architecture")
    if problems:  # all or nothing: a plugin that broke contributes no family, not half of its families
        broken.append(BrokenPlugin(plugin, _cut(_one_line("; ".join(problems)), 1000, quote=False), dist[0]))
    else:
        entries.update(mine)


def _why(e: BaseException) -> str:
    """'Type: message' of a plugin's exception, cut short; never raises, whatever the plugin's __str__ does."""
    try:
        text = str(e)
    except BaseException:  # noqa: BLE001  (a hostile __str__ must not escape either)
        text = "<unprintable>"
    return _cut(f"{type(e).__name__}: {text}", quote=False)


def _cut(x, n: int = 300, quote: bool = True) -> str:
    """repr(x) (or x itself when not quote), at most n characters: a plugin can put megabytes in a name."""
    try:
        r = repr(x) if quote else str(x)
    except BaseException:  # noqa: BLE001
        r = "<unprintable>"
    return r if len(r) <= n else r[:n - 3] + "..."


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
