"""Commands that need no weights never import torch or transformers (checked with ``-X importtime``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.fixtures.models import TINY_CORPUS, train_spm
from tests.helpers import process_env

HEAVY = {"torch", "transformers"}
# "import time: self [us] | cumulative | imported package", the name indented by nesting depth
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)\s*$")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    (path / "spiece.model").write_bytes(train_spm(TINY_CORPUS, vocab_size=600))
    (path / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "max_position_embeddings": 2048}), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("env")
    return process_env(base / "hf", base / "home")


def imported_modules(env, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rinna_cli", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    modules = [m.group(2) for m in map(IMPORT_LINE.match, stderr.splitlines()) if m]
    return result, modules


def heavy(modules: list[str]) -> list[str]:
    return [name for name in modules if name.split(".")[0] in HEAVY]


def test_parser_recognises_importtime_lines():
    lines = [
        "import time: self [us] | cumulative | imported package",
        "import time:       354 |        354 |     importlib.abc",
        "import time:     12345 |     987654 | torch",
        "import time:        10 |         10 |   transformers.utils",
        "import time:        10 |         10 |   torchvision",
    ]
    names = [m.group(2) for m in map(IMPORT_LINE.match, lines) if m]
    assert names == ["importlib.abc", "torch", "transformers.utils", "torchvision"]
    assert heavy(names) == ["torch", "transformers.utils"]


def test_help_imports_no_torch(env):
    result, modules = imported_modules(env, "--help")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"tokenize" in result.stdout
    assert "rinna_cli.cli" in modules  # the parse saw the real imports
    assert heavy(modules) == []


def test_tokenize_imports_no_torch(env, folder):
    result, modules = imported_modules(env, "tokenize", "--model", str(folder), "--count", "猫")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout == b"1\n"
    assert "sentencepiece" in modules
    assert heavy(modules) == []


def test_show_prompt_imports_no_torch(env, folder):
    result, modules = imported_modules(env, "ask", "--model", str(folder), "--show-prompt", "猫")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode("utf-8") == "ユーザー: 猫<NL>システム: \n"
    assert heavy(modules) == []


@pytest.mark.parametrize("args", [["--version"], []], ids=["version", "alone"])
def test_version_and_bare_rinna_import_no_torch(env, args):
    """--version reads torch's and transformers' versions from their metadata, never by importing them."""
    result, modules = imported_modules(env, *args)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert (b"torch " in result.stdout) == bool(args)
    assert "rinna_cli.cli" in modules
    assert heavy(modules) == []
