"""archkit: run decoder-only language models from Hugging Face checkpoints; every family is a plugin.

    import core
    core.architectures()                      # ['gpt2', 'llama', 'qwen3', ...]
    model = core.load("path/to/ckpt")         # family detected from config.json
    model.generate_text("Hello", max_new_tokens=20)
    core.Chat(model).send("Hi!")              # through the checkpoint's chat template (needs jinja2)
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .chat import Chat, ChatTemplate
from .errors import *  # noqa: F401,F403  (the error types are part of the public surface)
from .hookspecs import hookimpl
from .load import load
from .registry import Registry, default_registry
from .custom_ops import CustomOp
from .spec import API_VERSION, ConfigKey, Derived, Detection, ExtraRole, ModelSpec, W, WeightRule

try:
    __version__ = _version("archkit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0+src"


def architectures() -> list[str]:
    """Names of the registered families."""
    return list(default_registry())


__all__ = ["load", "architectures", "hookimpl", "Registry", "default_registry", "ModelSpec", "WeightRule", "W",
           "ConfigKey", "Derived", "Detection", "ExtraRole", "CustomOp", "API_VERSION", "Chat", "ChatTemplate", "__version__"]
