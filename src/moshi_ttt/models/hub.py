"""The Hugging Face Hub when it cannot be reached: the local cache first, one clear error fast.

``hub_offline_reason()`` says why the Hub is out of reach (``HF_HUB_OFFLINE`` set, or a
``PROBE_TIMEOUT_S`` probe of the endpoint failed), None when it answers. Offline, a file is
read from the local cache or refused at once by ``HubFileMissing`` naming the repository, the
file and the local-path alternative, instead of huggingface_hub's retries and moshi's guess
that a repo without a (reachable) config.json is the 7B. ``offline_mode()`` runs moshi's own
downloads against the cache only.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST

PROBE_TIMEOUT_S = 3.0  # the one reachability probe of the Hub's endpoint
_TRUE = {"1", "on", "yes", "true"}
_probed: dict[str, str | None] = {}  # endpoint -> why it is unreachable (None: it answered)


class HubFileMissing(FileNotFoundError):
    """A Hub file that is neither reachable nor in the local cache."""


def hub_endpoint() -> str:
    """The Hub's address (``HF_ENDPOINT``, read now, else huggingface_hub's)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _probe(endpoint: str, timeout: float) -> str | None:
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, if with an error status: it is reachable
    except (OSError, ValueError) as e:  # URLError, refused, timeout, no DNS, bad URL
        reason = getattr(e, "reason", None) or e
        return f"the Hugging Face Hub ({endpoint}) cannot be reached ({reason})"


def hub_offline_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be used now, or None when it can. ``HF_HUB_OFFLINE`` (env, read now,
    or huggingface_hub's constant) wins; otherwise the endpoint is probed once per process
    (a HEAD request of at most ``timeout`` seconds; any HTTP answer counts as reachable)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if env in _TRUE or (constants.HF_HUB_OFFLINE and env == ""):
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    if endpoint not in _probed:
        _probed[endpoint] = _probe(endpoint, timeout)
    return _probed[endpoint]


def local_alternative(repo: str) -> str:
    """How to get ``repo`` onto a machine without network, as one sentence."""
    return (
        f"download it on a machine with network (`huggingface-cli download {repo} "
        f"--local-dir DIR`) and pass the directory instead of the repo id (--base DIR, or in "
        f"a training config model.source: local with model.path: DIR; for a repo without "
        f"config.json, moshi's 7B, model.source: hf with model.hf_repo: DIR)"
    )


def missing_error(repo: str, filename: str, why: str) -> HubFileMissing:
    """The one error for a Hub file that cannot be had: repository, file, reason, remedy."""
    return HubFileMissing(
        f"cannot get {filename!r} of {repo!r}: {why}, and it is not in the local Hugging Face "
        f"cache ({_cache_dir()}); {local_alternative(repo)}"
    )


def cached(repo: str, filename: str) -> Path | bool | None:
    """``filename`` of ``repo`` in the local cache: its path, False when the cache records that
    the repo has no such file, None when the cache knows nothing of it."""
    found = try_to_load_from_cache(repo, filename, cache_dir=_cache_dir())
    if found is _CACHED_NO_EXIST:
        return False
    return Path(found) if isinstance(found, str) else None


def hub_file(repo: str, filename: str) -> Path:
    """``filename`` of ``repo``: from the cache when it is there, else downloaded; a
    ``HubFileMissing`` at once when the Hub cannot be reached and the cache lacks it.
    huggingface_hub's own errors (no such repo or file) are ``OSError``s as they are."""
    found = cached(repo, filename)
    if isinstance(found, Path):
        return found
    why = hub_offline_reason()
    if why is not None:
        raise missing_error(repo, filename, why)
    return Path(hf_hub_download(repo, filename, cache_dir=_cache_dir()))


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """huggingface_hub in offline mode inside the block: every download (moshi's included)
    reads the local cache and fails at once on a file it lacks, with no network attempt."""
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _cache_dir() -> str:
    """The hub cache huggingface_hub (and so moshi) downloads into."""
    return constants.HF_HUB_CACHE
