"""The Hugging Face Hub: upload an export folder, fetch one by its id (`huggingface_hub`, the
`hub` extra). The Hub is optional: every failure to reach it is one line saying what to do.

    push("exports/tiny_llada", "my-org/tiny-mdm")      # -> the repository's URL
    fetch("my-org/tiny-mdm")                           # -> a local folder (the Hub's cache)

A fetch looks in the local cache first (no network: it works offline for a model fetched
before), then asks the Hub with a bounded wait: a Hub that does not answer is an error after
`TIMEOUT_S` seconds, never a hang.
"""

from __future__ import annotations

import os
import re

from mdm_jax import storage
from mdm_jax.errors import UserError

TIMEOUT_S = 15.0
PREFIX = "hf://"
# ORG/NAME as the Hub spells repository ids (letters, digits, -, _, .), or hf://ORG/NAME
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(UserError, OSError):
    """The Hub could not be used; the message says why and what to do."""


def repo_id(text: str) -> str | None:
    """The repository id `text` names (ORG/NAME or hf://ORG/NAME), else None."""
    name = text[len(PREFIX):] if text.startswith(PREFIX) else text
    return name if REPO_ID.match(name) and ".." not in name else None


def _library():
    try:
        import httpx2
        import huggingface_hub
    except ImportError:
        raise HubError("the Hugging Face Hub needs huggingface_hub: install the hub extra "
                       "(bash launch/setup.sh hub, or pip install 'mdm_jax[hub]')") from None
    return huggingface_hub, httpx2


def _unreachable(e: BaseException) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (unset it to reach the Hub)"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"could not reach the Hugging Face Hub at {constants.ENDPOINT} ({first})"


def _probe(api, repo: str, httpx2) -> bool:
    """Whether `repo` exists, asked with a bounded wait (the library's default waits for
    ever on a server that accepts and never answers)."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        api.model_info(repo, timeout=TIMEOUT_S)
        return True
    except RepositoryNotFoundError:
        return False
    except (OfflineModeIsEnabled, httpx2.TransportError) as e:
        raise HubError(_unreachable(e)) from None


def push(folder: str, repo: str, private: bool = False,
         message: str = "mdm_jax export") -> str:
    """Upload `folder` to the model repository `repo` (created if new; private if asked):
    HfApi.create_repo + HfApi.upload_folder. Returns the repository's URL."""
    hub, httpx2 = _library()
    from huggingface_hub.errors import HfHubHTTPError

    api = hub.HfApi()
    where = f"the export is complete at {folder}: upload it later with `hf upload {repo} " \
            f"{folder}`"
    try:
        if not _probe(api, repo, httpx2):
            api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, commit_message=message)
    except HubError as e:
        raise HubError(f"--push-to-hub {repo}: {e}; {where}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = "the Hub refused the upload: log in with `hf auth login` or set HF_TOKEN to a " \
              "token that may write there" if status in (401, 403) else \
            f"the Hub answered: {str(e).splitlines()[0]}"
        raise HubError(f"--push-to-hub {repo}: {why}; {where}") from None
    except (OSError, httpx2.HTTPError) as e:
        raise HubError(f"--push-to-hub {repo}: {_unreachable(e)}; {where}") from None
    return f"{hub.constants.ENDPOINT}/{repo}"


def fetch(repo: str) -> str:
    """A local folder holding the files of model repository `repo`: the Hub's cache if it
    has them, else downloaded (snapshot_download)."""
    hub, httpx2 = _library()
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hub.snapshot_download(repo, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    api = hub.HfApi()
    try:
        if not _probe(api, repo, httpx2):
            raise HubError("the Hub has no model repository of that name (or it is private: "
                           "log in with `hf auth login` or set HF_TOKEN)")
        return hub.snapshot_download(repo)
    except HubError as e:
        raise HubError(f"{repo}: {e}") from None
    except (OSError, httpx2.HTTPError) as e:
        raise HubError(f"{repo}: {_unreachable(e)}") from None


def local_or_hub(path: str) -> str:
    """`path` itself unless it names a Hub model: hf://ORG/NAME, or ORG/NAME where neither
    ORG/NAME nor a folder ORG exists here (so `runs/tiny_mdm` stays a local path, missing or
    not, and the caller's own message names it). A Hub model's folder is fetched."""
    hub_prefixed = path.startswith(PREFIX)
    repo = repo_id(path)
    if repo is None or (not hub_prefixed and (storage.is_remote(path) or os.path.exists(path)
                                              or os.path.isdir(repo.split("/")[0]))):
        return path
    return fetch(repo)
