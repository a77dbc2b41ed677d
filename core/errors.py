"""Every error archkit raises on purpose. Each subclasses a builtin so callers can catch either.

Messages name the offender (file, tensor, key, plugin, token id) and the rule that was broken.
"""

from __future__ import annotations


def brief(v, n: int = 80) -> str:
    """repr(v) cut to n characters: a value from a file or a request can be megabytes long, and an error is one line."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


class ArchkitError(Exception):
    """Base of every archkit error; the CLI prints these as one line."""


class CheckpointError(ArchkitError, ValueError):
    """The checkpoint directory or one of its files is missing, unreadable or malformed."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor is stored in a dtype archkit does not read (only F32, F16, BF16 are)."""


class WeightsError(CheckpointError):
    """Tensors missing, unexpected or of the wrong shape; the message lists all of them at once."""

    def __init__(self, path, missing=(), unexpected=(), mismatched=()):
        self.path, self.missing, self.unexpected, self.mismatched = path, list(missing), list(unexpected), list(mismatched)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        if mismatched:
            parts.append(f"{len(mismatched)} with the wrong shape: " + ", ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
        super().__init__(f"{path}: tensors do not match the architecture ({'; '.join(parts)})")


class ConfigError(ArchkitError, ValueError):
    """config.json (or a value derived from it) is missing, malformed, or not supported."""


class ArchitectureError(ArchkitError, KeyError):
    """Base for errors about which family a checkpoint belongs to."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownArchitectureError(ArchitectureError):
    """No registered plugin claims the checkpoint, or an unknown plugin name was asked for."""


class AmbiguousArchitectureError(ArchitectureError):
    """Several plugins claim the checkpoint equally well."""


class PluginError(ArchkitError, RuntimeError):
    """A plugin failed to import, raised in its hook, or registered an invalid or duplicate spec."""


class SpecError(PluginError, TypeError):
    """A ModelSpec breaks the contract (bad pattern, unknown flag, wrong API version)."""


class TokenizerError(ArchkitError, ValueError):
    """tokenizer.json is missing or cannot be read."""


class ChatTemplateError(ArchkitError, ValueError):
    """No chat template in the checkpoint, jinja2 missing, or the template failed to render."""


class GenerationError(ArchkitError, ValueError):
    """Bad input to logits()/generate(): token ids, prompt length, sampling parameters."""


class ContextOverflowError(GenerationError):
    """Prompt plus new tokens do not fit the model's (or the cache's) context."""


class DeviceError(ArchkitError, RuntimeError):
    """The requested device cannot be used, or a kernel failed; names the op."""


class DeviceMemoryError(DeviceError, MemoryError):
    """Not enough GPU memory; says how much was needed and how much was free."""


class NonFiniteLogitsError(GenerationError):
    """The model produced NaN or infinite logits (corrupt or overflowing weights); `step` is the generation step
    (None where the raiser does not know it: a backend's decode, whose caller then names it with at_step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

    def at_step(self, step: int) -> "NonFiniteLogitsError":
        """This error naming `step`, if it does not name one yet."""
        return self if self.step is not None else NonFiniteLogitsError(f"{self} (at generation step {step})", step)


class ServeError(ArchkitError, RuntimeError):
    """`archkit serve` cannot start or go on: its dependencies are missing, the model cannot serve text, or the
    engine has stopped."""


class ChatBusyError(ArchkitError, RuntimeError):
    """A core.Chat was asked for a turn while another turn of the same conversation was under way."""


class QueueFullError(GenerationError):
    """The engine's waiting queue is full: try again later (the server answers 503)."""


class TensorParallelError(ArchkitError, ValueError):
    """A model cannot be split over the ranks asked for: a size not divisible by the rank count (heads, kv heads,
    intermediate size, experts), or a capability the sharding plan cannot split; names the size and the count."""


class LauncherEnvError(TensorParallelError):
    """The environment a launcher (torchrun, srun, mpirun, Ray) gave a rank is missing or contradicts itself;
    names the variable and the rule."""


class RendezvousError(ArchkitError, RuntimeError):
    """The ranks of a tensor-parallel launch could not meet at the rendezvous address (a rank missing past the
    timeout, two ranks claiming one number, ranks disagreeing on the world size); names the address and the ranks."""


class QuantizationError(CheckpointError):
    """A quantized checkpoint (GPTQ, AWQ, FP8, compressed-tensors) is malformed or uses what archkit does not read:
    the message names the tensor (or the quantization_config key) and the rule it breaks."""
