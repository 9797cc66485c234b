"""Shared pytest fixtures: tiny offline stand-ins for rinna's models.

``tiny_model``: a random-weight GPT-NeoX in rinna's exact folder layout, built
once per session (milliseconds, after the transformers import).
``memorized_model``: the committed ``tests/fixtures/memorized`` folder, whose
greedy replies are ``tests.fixtures.memorized_data.CONVERSATIONS``; ``memorized_tokenizer``
its tokenizer. ``scripted_engine``: a fresh :class:`tests.fakes.ScriptedEngine` (the one
fake engine); ``run_cli``: ``rinna ARGS`` in-process (:func:`tests.fakes.run_cli`).
Nothing here touches the network or the Hugging Face hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Make ``rinna_cli`` and ``tests.fixtures`` importable however pytest is started
# (``pytest``, ``python -m pytest``, any import mode, any working directory).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEMORIZED_DIR = ROOT / "tests" / "fixtures" / "memorized"
# `make test` runs one pytest-xdist worker per core: a second OpenMP thread in each would only
# oversubscribe the cores (spinning waits). Set before torch is imported, which reads it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path to a freshly built random tiny GPT-NeoX folder (rinna layout)."""
    from tests.fixtures.models import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def memorized_model() -> Path:
    """Path to the committed memorized model folder (read-only: copy it before changing files)."""
    if not (MEMORIZED_DIR / "config.json").is_file():
        pytest.fail(f"{MEMORIZED_DIR} is missing; run: python tests/fixtures/train_memorized.py")
    return MEMORIZED_DIR


@pytest.fixture(autouse=True, scope="session")
def _isolated_app_dir(tmp_path_factory):
    """Everything rinna-cli writes in-process (config, sessions, the int8 cache) goes to a temp dir."""
    import os

    saved = {key: os.environ.get(key) for key in ("RINNA_CLI_HOME", "HF_HUB_OFFLINE")}
    os.environ["RINNA_CLI_HOME"] = str(tmp_path_factory.mktemp("rinna_cli_home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def memorized_tokenizer(memorized_model):
    """The memorized model's tokenizer (no weights loaded)."""
    from rinna_cli.tokenizer import Tokenizer

    return Tokenizer.from_folder(memorized_model)


@pytest.fixture
def scripted_engine(memorized_tokenizer):
    """A fresh :class:`tests.fakes.ScriptedEngine` on the memorized tokenizer; ``.enqueue()`` its replies."""
    from tests.fakes import ScriptedEngine

    return ScriptedEngine(memorized_tokenizer)


@pytest.fixture
def run_cli(monkeypatch):
    """``rinna ARGS`` in-process (see :func:`tests.fakes.run_cli`), here with the engine a test passes."""
    from tests.fakes import run_cli

    monkeypatch.delenv("RINNA_MODEL", raising=False)
    return run_cli
