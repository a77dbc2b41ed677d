"""archkit's logger ("archkit"): library code reports through it and never prints; the CLI shows it on stderr.

Without any logging setup Python shows warnings (and worse) on stderr and hides the rest, so a script sees
"config.json: eos_token_id 50256 ... ignored" but not "device auto → cpu"; `logging.getLogger("archkit")`
tunes both.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("archkit")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time this process sees it (a model loaded twice warns once)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
