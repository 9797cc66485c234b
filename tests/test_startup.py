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


def test_ctrl_c_while_the_command_line_imports_ends_quietly_with_130(env):
    """The executable's entry (rinna_cli.entry): a SIGINT during the command line's own import (about 0.1 s) ends the
    program with 130 and nothing on stderr, where it printed a KeyboardInterrupt traceback."""
    script = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def interrupting(name, *args, **kwargs):\n"
        "    if name == 'rinna_cli.cli':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupting\n"
        "sys.argv = ['rinna', '--version']\n"
        "from rinna_cli.entry import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (130, b"", b"")
    # after the import the command line's own handling holds: --version runs to its end
    script = script.replace("os.kill(os.getpid(), signal.SIGINT)", "pass")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(b"rinna-cli ") and result.stderr == b""
    # where SIGINT is ignored (a background job of a script, nohup) it stays ignored
    script = script.replace("pass", "os.kill(os.getpid(), signal.SIGINT)").replace(
        "sys.argv = ", "signal.signal(signal.SIGINT, signal.SIG_IGN)\nsys.argv = "
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(b"rinna-cli ") and result.stderr == b""
