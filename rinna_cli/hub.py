"""Where a model lives: a local folder, or a hub id fetched into the Hugging Face cache.

Only the files a command needs are fetched: ``rinna tokenize`` takes the
tokenizer files, never the 7 GB of weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from rinna_cli.errors import ModelError
from rinna_cli.tokenizer import TOKENIZER_FILES

DEFAULT_MODEL = "rinna/japanese-gpt-neox-3.6b-instruction-sft"
ALIASES = {
    "sft": DEFAULT_MODEL,
    "sft-v2": "rinna/japanese-gpt-neox-3.6b-instruction-sft-v2",
    "ppo": "rinna/japanese-gpt-neox-3.6b-instruction-ppo",
}
CONFIG = "config.json"
SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
PICKLE = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def expand(name: str) -> str:
    """A model alias (``sft``, ``sft-v2``, ``ppo``) as its hub id; anything else unchanged."""
    return ALIASES.get(name, name)


def canonical(name: str) -> str:
    """One spelling per model: aliases expanded, folders as resolved absolute paths."""
    name = expand(name)
    return str(Path(name).expanduser().resolve()) if _is_path(name) else name


def _is_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1


def locate(name: str, weights: bool = False) -> Path:
    """The local folder holding ``name``'s tokenizer and config (and weights if asked)."""
    name = expand(name)
    if _is_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"{folder}: no such model folder")
        return folder
    files = [*TOKENIZER_FILES, CONFIG]
    folder = _download(name, files + list(SAFETENSORS) if weights else files)
    if weights and not any(folder.glob("*.safetensors")):
        folder = _download(name, files + list(PICKLE))
    return folder


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached; "
            "download it once while online, or pass --model /path/to/model-folder "
            "(with HF_HUB_OFFLINE=1 set, only the cache is used)"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a login)") from None
    except HfHubHTTPError as err:
        raise ModelError(f"{repo_id}: download failed: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ModelError(f"{repo_id}: download failed: {err}") from None


def read_config(folder: Path) -> dict:
    """``config.json``, checked to be a GPT-NeoX causal LM."""
    path = folder / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; a rinna model folder holds config.json") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("model_type") != "gpt_neox":
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ModelError(f"{path}: model_type is {kind!r}, not 'gpt_neox'; rinna-cli runs rinna's GPT-NeoX models")
    return data


def context_window(config: dict) -> int:
    return int(config.get("max_position_embeddings", 2048))
