"""What the real-process tests share: how to start ``rinna``, and a clean environment for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("rinna")
RINNA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "rinna_cli"]
# Variables that would change what rinna does or prints: its own, the hub's, Python's, the terminal size.
_DROPPED_PREFIXES = ("RINNA_", "HF_", "HUGGINGFACE_", "PYTHON", "TRANSFORMERS_")
_DROPPED = ("FORCE_COLOR", "COLUMNS", "LINES")


def process_env(hf_home: Path, app_home: Path, **extra: str) -> dict:
    """This process's environment without what could leak into a test run, offline, with its own homes."""
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith(_DROPPED_PREFIXES) and key not in _DROPPED
    }
    environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), RINNA_CLI_HOME=str(app_home), **extra)
    return environ
