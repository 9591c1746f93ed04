"""The Hugging Face Hub: push an export folder, download one.

What an export folder holds, and how it is written and read, is :mod:`decode_accel.export`;
``load_exported`` there takes a Hub id too (it downloads through :func:`download`). The export names are
also importable from here, as model cards written before ``decode_accel.export`` existed say.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from decode_accel.errors import DecodeAccelError
# the export's names, importable from here as older model cards and notebooks do
from decode_accel.export import (EXPORT_FORMAT_VERSION, REQUIRED_FILES, ExportedModel, download,  # noqa: F401
                                 export_model, is_repo_id, load_exported)
from decode_accel.export import REPO_ID as _REPO_ID

__all__ = ["push_to_hub", "download", "ExportedModel", "export_model", "load_exported", "EXPORT_FORMAT_VERSION"]


# ----------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------

def push_to_hub(export_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None, *,
                commit_message: str = "Upload decode_accel model") -> Any:
    """Upload an export folder to the Hugging Face Hub (``HfApi.create_repo`` + ``upload_folder``).

    Returns:
        The commit info returned by ``upload_folder``.
    """
    # optional dependency, imported only for a push: huggingface_hub costs ~0.3 s at start-up
    from huggingface_hub import HfApi

    folder = Path(export_dir)
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise DecodeAccelError(f"missing {name}", path=folder, fix="push a folder written by export_model")
    if not _REPO_ID.match(repo_id):
        raise DecodeAccelError(f"'{repo_id}' is not a Hub id", field="repo_id", fix="use the form user/model-name")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    except Exception as err:  # noqa: BLE001 - offline / HTTP / auth errors have no common base class
        kind = type(err).__name__
        raise DecodeAccelError(f"cannot push to '{repo_id}' ({kind}: {str(err).splitlines()[0] if str(err) else kind})",
                               field="repo_id", fix="check the network, HF_HUB_OFFLINE and your token "
                                                    "(huggingface-cli login)") from None
