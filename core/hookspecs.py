"""The one hook a family plugin implements."""

import pluggy

hookspec = pluggy.HookspecMarker("archkit")
hookimpl = pluggy.HookimplMarker("archkit")


@hookspec
def archkit_register_architectures(register):
    """Call ``register(spec)`` once for each core.spec.ModelSpec this plugin provides.

    The host validates each spec (API version, patterns, flags) and rejects duplicates by name.
    """
