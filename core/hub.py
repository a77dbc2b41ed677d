"""Hugging Face hub ids ("Qwen/Qwen3-0.6B") resolved to a snapshot directory through huggingface_hub.

huggingface_hub is the library transformers uses, so a model already downloaded by transformers, vLLM or
`hf download` is found in the same cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)
without a second copy. With HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, only the cache is looked at;
otherwise missing files are downloaded, and an unreachable Hub falls back to the cache. Only the files
archkit reads are fetched: JSON configs and tokenizer, safetensors weights, Jinja chat templates.
huggingface_hub is the optional extra `hub` (pip install 'archkit[hub]').
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
# owner/name as the Hub spells them: letters, digits, '-', '_', '.', not starting with '-' or '.'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
HUB_HINT = "pip install 'archkit[hub]' (or huggingface_hub)"


def is_hub_id(path) -> bool:
    """Whether `path` is spelled like a hub model id (owner/name), whatever exists on disk."""
    return isinstance(path, str) and HUB_ID.fullmatch(path) is not None and ".." not in path and "--" not in path


def offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set true, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return env in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def resolve(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The checkpoint directory for `path`: itself when it exists on disk (a local path always wins), else
    the snapshot of hub id `path` at `revision` (default: main). CheckpointError, one line, if neither."""
    if not is_hub_id(path) or Path(path).exists():
        if revision is not None:
            raise CheckpointError(f"{path}: revision={revision!r} applies to hub ids, and this is a local path")
        return Path(path)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{path}: no such checkpoint directory; to load it as a Hugging Face hub id, "
                              f"{HUB_HINT}") from None
    return Path(_snapshot(path, revision))


def _snapshot(repo: str, revision: str | None) -> str:
    """snapshot_download of the files archkit reads; its errors become one-line CheckpointErrors."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    # a subclass of LocalEntryNotFoundError in recent releases only; `except ()` catches nothing
    incomplete = getattr(errors, "IncompleteSnapshotError", ())

    at = f" at revision {revision!r}" if revision else ""
    get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    local = offline()
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=local)
    except incomplete:
        raise CheckpointError(f"{repo}: the cached snapshot{at} in {constants.HF_HUB_CACHE} is incomplete; "
                              f"run `{get}` with network access to complete it") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if local else "the Hugging Face Hub cannot be reached"
        raise CheckpointError(f"{repo}: not a local directory, and not in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}){at} while {why}; run `{get}` with network access "
                              "first") from None
    except GatedRepoError:
        raise CheckpointError(f"{repo}: gated on the Hugging Face Hub; accept its terms at "
                              f"https://huggingface.co/{repo}, then run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such model on the Hugging Face Hub (or it is private: run "
                              "`hf auth login`), and no such local directory") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo}: revision {revision!r} does not exist on the Hugging Face Hub") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo}: the Hugging Face Hub failed ({_first_line(e)})") from None
    except HFValidationError as e:
        raise CheckpointError(f"{repo}: not a valid hub id ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
