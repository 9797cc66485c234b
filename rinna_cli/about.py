"""What ``rinna --version`` prints: the versions that decide rinna-cli's behaviour, and where its files live.

The libraries' versions are read from their installed metadata, so nothing heavy
(torch, transformers) is imported to print them.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from rinna_cli import __version__, config
from rinna_cli.inputs import escaped

LIBRARIES = ("torch", "transformers", "sentencepiece")


def _installed(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} not installed"


def version_text() -> str:
    """rinna-cli's version, Python's and the libraries'; the config file, app directory and caches."""
    from huggingface_hub import constants  # a constants module: no network, no torch

    user_config = config.user_config_path()
    state = "" if user_config.is_file() else " (not created; keys as in the shipped defaults.toml)"
    paths = [
        ("config", f"{user_config}{state}"),
        ("app dir", f"{config.app_dir()} (sessions, input history; RINNA_CLI_HOME moves it)"),
        ("cache", f"{config.cache_dir()} (quantized weights)"),
        ("models", f"{Path(constants.HF_HUB_CACHE)} (the Hugging Face cache)"),
    ]
    lines = [
        f"rinna-cli {__version__}",
        f"Python {platform.python_version()}, {', '.join(map(_installed, LIBRARIES))}",
        *(f"{name + ':':<9}{escaped(where)}" for name, where in paths),
    ]
    return "\n".join(lines)
