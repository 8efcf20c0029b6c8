"""Hugging Face Hub helpers: fail early and clearly when the Hub cannot be reached."""

from __future__ import annotations

from huggingface_hub import HfApi, is_offline_mode


def ensure_hub_available(action: str, token: str | None = None) -> None:
    """Raise a `RuntimeError` explaining why `action` cannot reach the Hub (offline mode, no network, no login)."""
    if is_offline_mode():
        raise RuntimeError(
            f"Cannot {action}: HF_HUB_OFFLINE is set, so the Hugging Face Hub is not contacted. Unset it (and make "
            "sure the machine can reach huggingface.co), or drop the hub option and use local files."
        )
    try:
        HfApi(token=token).whoami()
    except Exception as error:  # network errors and auth errors come as many types
        raise RuntimeError(
            f"Cannot {action}: the Hugging Face Hub is unreachable or the token is not valid "
            f"({type(error).__name__}: {error}). Log in with `hf auth login` or pass --hub_token."
        ) from None


def push_folder_to_hub(folder: str, repo_id: str, token: str | None = None, commit_message: str = "Upload model") -> str:
    """Create `repo_id` if needed and upload `folder` (weights, config, processor, model card); return the URL."""
    ensure_hub_available(f"push to the Hub repository {repo_id!r}", token)
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message).commit_url
