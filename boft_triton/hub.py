"""The Hugging Face Hub side of adapters: where an adapter id points, and pushing one."""

from __future__ import annotations

import os
import tempfile

# What load_adapter / from_pretrained pass on to huggingface_hub.snapshot_download.
HUB_KEYWORDS = {"token", "cache_dir", "force_download", "local_files_only", "proxies", "repo_type"}


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        **hub_kwargs) -> str:
    """A local folder holding the adapter: ``model_id`` itself when it is a folder, otherwise the
    Hub repo ``model_id`` at ``revision``, fetched (or read from the cache) with huggingface_hub."""
    unknown = sorted(set(hub_kwargs) - HUB_KEYWORDS)
    if unknown:
        raise TypeError(f"Unexpected keyword arguments {unknown}; the Hub download takes {sorted(HUB_KEYWORDS)}.")
    if os.path.isdir(model_id):  # a local folder has no revisions: PEFT ignores revision there too
        return os.path.join(model_id, subfolder or "")
    from huggingface_hub import snapshot_download

    allow = [f"{subfolder}/*"] if subfolder else None
    try:
        root = snapshot_download(str(model_id), revision=revision, allow_patterns=allow, **hub_kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"{str(model_id)!r} is neither a local adapter folder nor a Hub repo that could be fetched ({err})."
        ) from err
    return os.path.join(root, subfolder or "")


def push_to_hub(boft_model, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload BOFT adapter", revision: str | None = None,
                create_pr: bool = False, selected_adapters: list[str] | None = None) -> object:
    """Save the adapter(s) in PEFT's layout into a temporary folder and upload that folder to
    ``repo_id`` (created if missing), as ``PeftModel.push_to_hub`` does. Returns the commit info."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        boft_model.save_pretrained(folder, selected_adapters=selected_adapters)
        return upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token,
                             revision=revision, create_pr=create_pr)
