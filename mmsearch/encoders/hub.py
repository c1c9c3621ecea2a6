"""Model files from the Hugging Face Hub: the local cache first, then one short try on the hub.

huggingface_hub retries an unreachable hub with back-off (about 25 s per file, printing a warning
per retry), so an offline first run used to wait a minute and end in a message about a pickle
file. Here a file comes from the cache without any network; only when it is not there is the hub
asked, once, with a short timeout, and an unreachable hub is one ModelError saying what to do.
Weights are taken only as safetensors: pickle-based files can run code when loaded.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..errors import ModelError

HUB_TIMEOUT = 10.0  # seconds for the one metadata request that tells whether the hub answers
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class HubUnreachable(ModelError):
    """The file is not in the local cache and the hub could not be asked for it."""


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable_message(what: str, option: str, why: str, source: str = "") -> str:
    """One line: what could not be fetched, why, and the three ways out."""
    if source:
        what = f"{what} ({source})"
    if offline():
        return (
            f"could not load {what}: HF_HUB_OFFLINE=1 is set and it is not in the Hugging Face "
            f"cache ({cache_dir()}); pass {option} DIR (a local model directory), or unset "
            "HF_HUB_OFFLINE once to download it"
        )
    return (
        f"could not download {what}: the Hugging Face Hub is unreachable ({why}) and it is not "
        f"in the cache ({cache_dir()}); pass {option} DIR (a local model directory), or connect "
        "once to download it (HF_HUB_OFFLINE=1 uses only the cache)"
    )


def pickle_message(where: str) -> str:
    return (
        f"refusing to load {where}: pickle weights (.bin/.pt/.pth) can run code when loaded; "
        'mmsearch loads only safetensors. Convert them once, e.g. python -c "import torch; '
        "from safetensors.torch import save_file; sd = torch.load('IN.bin', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'open_clip_model.safetensors')\""
    )


@contextlib.contextmanager
def quiet():
    """huggingface_hub logs a warning per retry and per fallback; the library never prints."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


@contextlib.contextmanager
def cache_only():
    """Every hub look-up inside resolves from the local cache, as with HF_HUB_OFFLINE=1: for
    libraries (open_clip) that fetch files again that `fetch` has just put in the cache."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        with quiet():
            yield
    finally:
        constants.HF_HUB_OFFLINE = before


def cached(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached copy of `repo_id/filename`, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def on_hub(
    repo_id: str, filename: str, what: str, option: str, revision: str | None = None
) -> bool:
    """Whether the hub has `repo_id/filename`: one HEAD request, no retries.

    Raises HubUnreachable when the hub does not answer (or HF_HUB_OFFLINE is set), ModelError when
    the repository does not exist or is gated.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = f"{repo_id}/{filename}"
    if offline():
        raise HubUnreachable(unreachable_message(what, option, "HF_HUB_OFFLINE=1", source))
    try:
        with quiet():
            get_hf_file_metadata(
                hf_hub_url(repo_id, filename, revision=revision), timeout=HUB_TIMEOUT
            )
        return True
    except GatedRepoError as e:
        raise ModelError(
            f"{what}: the repository {repo_id} is gated; accept its terms on huggingface.co and "
            "log in (hf auth login), or pass a local model directory"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"{what}: no repository {repo_id} on the Hugging Face Hub (or it is private: log in "
            "with hf auth login)"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelError(f"{what}: {repo_id} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # raised by some versions when the request failed
        raise HubUnreachable(unreachable_message(what, option, _short(e), source)) from e
    except EntryNotFoundError:
        return False
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            return False
        raise HubUnreachable(unreachable_message(what, option, f"HTTP {status}", source)) from e
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts, proxies
        raise HubUnreachable(unreachable_message(what, option, _short(e), source)) from e


def fetch(repo_id: str, filename: str, what: str, option: str, revision: str | None = None):
    """`repo_id/filename` from the cache, else downloaded after one check that the hub has it;
    None when the repository has no such file."""
    from huggingface_hub import hf_hub_download

    found = cached(repo_id, filename, revision)
    if found is not None:
        return found
    if not on_hub(repo_id, filename, what, option, revision):
        return None
    try:
        with quiet():
            return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:  # noqa: BLE001 - the connection dropped during the download
        source = f"{repo_id}/{filename}"
        raise HubUnreachable(unreachable_message(what, option, _short(e), source)) from e


def fetch_weights(
    repo_id: str, names: list[str], what: str, option: str, revision: str | None = None
) -> Path:
    """The first safetensors file of `names` in the repository (cache first). Pickle-only
    repositories are refused; a repository with neither is a ModelError."""
    safe = [n for n in names if n.endswith(SAFE_SUFFIX)]
    unsafe = [n for n in names if not n.endswith(SAFE_SUFFIX)]
    for name in safe:  # the cache first, for every name, before any network
        found = cached(repo_id, name, revision)
        if found is not None:
            return found
    for name in unsafe:
        if cached(repo_id, name, revision) is not None:
            raise ModelError(pickle_message(f"{what} ({repo_id}/{name})"))
    for name in safe:
        found = fetch(repo_id, name, what, option, revision)
        if found is not None:
            return found
    for name in unsafe:
        if on_hub(repo_id, name, what, option, revision):
            raise ModelError(pickle_message(f"{what} ({repo_id} has only {name})"))
    raise ModelError(f"{what}: {repo_id} has no weights file ({', '.join(names)})")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
