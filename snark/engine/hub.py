"""Where a model's files come from: a local folder, the hub cache, or a download, decided at once.

Left to itself, loading a hub id with no network spends minutes in the hub client's retries (five per
file, for each of a dozen files) before failing. Instead Snark asks the hub once, with a short
timeout: reachable, the files are downloaded (or found up to date in the cache); unreachable, the
cached copy is loaded offline, and without one the message comes right away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx

from snark.errors import ConfigError
from snark.progress import progress_class

log = logging.getLogger(__name__)

HUB_CHECK_TIMEOUT_S = 5.0
# What loading Qwen2.5-VL reads: weights, configs, tokenizer and processor files (not the README or images).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
_TRY_OFFLINE = "or run `snark serve --tiny` to try every endpoint offline with a tiny random-weight model"


@dataclass(frozen=True)
class Hub:
    """The hub to use: its address, the cache and whether to go online at all (huggingface_hub's
    HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE, unless given)."""

    endpoint: str
    cache_dir: str
    offline: bool

    @classmethod
    def from_environment(cls) -> Hub:
        from huggingface_hub import constants

        return cls(endpoint=constants.ENDPOINT, cache_dir=constants.HF_HUB_CACHE, offline=constants.HF_HUB_OFFLINE)


def unreachable(hub: Hub, repo_id: str) -> str | None:
    """Why the hub cannot be used right now (one request, no retries), or None when it answers."""
    url = f"{hub.endpoint}/api/models/{repo_id}"
    try:
        response = httpx.head(url, timeout=HUB_CHECK_TIMEOUT_S, follow_redirects=True)
    except httpx.TimeoutException:
        return f"no answer within {HUB_CHECK_TIMEOUT_S:g} s"
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__
    if response.status_code >= 500:
        return f"it answered {response.status_code}"
    return None  # an answer, even 401 or 404: the download itself then says what is wrong


def cached_snapshot(hub: Hub, repo_id: str) -> Path | None:
    """The cached copy of ``repo_id`` (its main revision), if there is one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, cache_dir=hub.cache_dir, local_files_only=True, allow_patterns=CHECKPOINT_FILES
        )
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return Path(folder)


def resolve_checkpoint(repo_id: str, hub: Hub | None = None) -> Path:
    """The local folder holding ``repo_id``'s files: downloaded if the hub answers, the cached copy if it
    does not. Raises ``ConfigError`` saying what to do when neither is possible."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    hub = hub or Hub.from_environment()
    if not hub.offline:
        log.info("looking %s up on %s", repo_id, hub.endpoint)
    problem = "HF_HUB_OFFLINE is set" if hub.offline else unreachable(hub, repo_id)
    if problem is not None:
        cached = cached_snapshot(hub, repo_id)
        if cached is None:
            raise ConfigError(
                f"Cannot load {repo_id!r}: the Hugging Face hub at {hub.endpoint} cannot be used ({problem}) and "
                f"there is no copy in the cache ({hub.cache_dir}). Check the network (or HF_ENDPOINT), set VLM_MODEL "
                f"to a local checkpoint folder, {_TRY_OFFLINE}."
            )
        if not hub.offline:
            log.warning(
                "the hub at %s cannot be reached (%s): loading the cached copy of %s", hub.endpoint, problem, repo_id
            )
        return cached
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            allow_patterns=CHECKPOINT_FILES,
            tqdm_class=progress_class(),
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(
            f"Could not download {repo_id!r} from {hub.endpoint}: {exc}\nCheck the id (a Qwen2.5-VL checkpoint), and "
            f"HF_TOKEN for a gated or private repo; or set VLM_MODEL to a local checkpoint folder, {_TRY_OFFLINE}."
        ) from exc
    return Path(folder)
