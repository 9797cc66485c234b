"""The command line as a real process: bytes in argv that are not UTF-8, ``rinna`` alone, ``--version``, ``--help``.

These need the real executable: Python turns such argv bytes into lone surrogates, and only a
real stderr (strict UTF-8) shows what printing one does; help is printed by typer on the real stdout.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

import rinna_cli
from tests.helpers import RINNA, process_env

ROOT = Path(__file__).resolve().parent.parent
HINT = "convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("command_line")
    return process_env(base / "hf", base / "home", COLUMNS="200")


def rinna(env: dict, *args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([*RINNA, *args], input=stdin, capture_output=True, env=env, cwd=ROOT, timeout=120)


def refusal(result: subprocess.CompletedProcess) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr (no traceback): that line."""
    assert (result.returncode, result.stdout) == (2, b""), result.stderr.decode(errors="replace")
    stderr = result.stderr.decode("utf-8")
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    return stderr.rstrip("\n")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["ask", "-m", "MODEL", b"abc\x80"],
            f"rinna: error: the question argument is not UTF-8 (byte 0x80 at offset 3 of 'abc\\x80'); {HINT}",
        ),
        (
            ["ask", "-m", "MODEL", "--show-prompt", "猫です".encode("shift_jis")],
            f"rinna: error: the question argument is not UTF-8 (byte 0x94 at offset 0 of '\\x94L\\x82ł\\xb7'); {HINT}",
        ),
        (
            ["tokenize", "-m", "MODEL", "--count", b"\xff"],
            f"rinna: error: the text argument is not UTF-8 (byte 0xff at offset 0 of '\\xff'); {HINT}",
        ),
        (
            ["ask", "-m", b"/tmp/x\x80y", "--show-prompt", "猫"],
            f"rinna: error: --model is not UTF-8 (byte 0x80 at offset 6 of '/tmp/x\\x80y'); {HINT}",
        ),
        (
            ["chat", "-m", "MODEL", "--load", b"/tmp/\xe3\x81.json"],
            f"rinna: error: --load is not UTF-8 (byte 0xe3 at offset 5 of '/tmp/\\xe3\\x81.json'); {HINT}",
        ),
        (["ask", b"--\x80", "猫"], "rinna: error: No such option: --\\x80 (see 'rinna ask --help')"),
    ],
    ids=["bad-byte", "shift-jis", "tokenize", "model-path", "load-path", "unknown-option"],
)
def test_arguments_that_are_not_utf8_are_refused(env, memorized_model, args, line):
    """Used to end in ``Unable to cast Python instance of type <class 'str'>`` or ``lost sys.stderr``."""
    args = [str(memorized_model) if arg == "MODEL" else arg for arg in args]
    assert refusal(rinna(env, *args)) == line


def test_a_long_argument_is_quoted_short(env, memorized_model):
    question = ("吾輩は猫である" * 20).encode("shift_jis")
    line = refusal(rinna(env, "ask", "-m", str(memorized_model), question))
    quoted = re.search(r"of '(.*)'\);", line)
    assert quoted and quoted.group(1).endswith("…") and len(quoted.group(1)) == 41, line


def test_rinna_alone_prints_the_help_and_exits_0(env):
    alone, asked = rinna(env), rinna(env, "--help")
    assert (alone.returncode, alone.stderr) == (0, b"")
    assert alone.stdout == asked.stdout
    assert b"Usage: rinna [OPTIONS] COMMAND [ARGS]..." in alone.stdout and b"--version" in alone.stdout


def test_version(env):
    result = rinna(env, "--version")
    assert (result.returncode, result.stderr) == (0, b""), result.stderr.decode()
    home = Path(env["RINNA_CLI_HOME"])
    libraries = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "sentencepiece"))
    assert result.stdout.decode("utf-8").splitlines() == [
        f"rinna-cli {metadata.version('rinna-cli')}",
        f"Python {platform.python_version()}, {libraries}",
        f"config:  {home / 'config.toml'} (not created; keys as in the shipped defaults.toml)",
        f"app dir: {home} (sessions, input history; RINNA_CLI_HOME moves it)",
        f"cache:   {home / 'cache'} (quantized weights)",
        f"models:  {Path(env['HF_HOME']) / 'hub'} (the Hugging Face cache)",
    ]
    assert rinna_cli.__version__ == metadata.version("rinna-cli")  # one version: pyproject's


def test_version_names_an_existing_config(env):
    home = Path(env["RINNA_CLI_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("temperature = 0.5\n", encoding="utf-8")
    try:
        lines = rinna(env, "-V").stdout.decode("utf-8").splitlines()
    finally:
        (home / "config.toml").unlink()
    assert lines[2] == f"config:  {home / 'config.toml'}"


def _row(help_text: str, option: str) -> str:
    (row,) = [line for line in help_text.splitlines() if re.search(rf"│ {option}\s", line)]
    return row


@pytest.mark.parametrize("command", ["ask", "chat", "tokenize", "batch", "serve"])
def test_help_shows_switches_and_defaults(env, command):
    result = rinna(env, command, "--help")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode("utf-8")
    assert "<bool>" not in text
    assert re.search(r"│ --help\s+-h\s+Show this message and exit\.", text), text
    assert "[default: rinna/japanese-gpt-neox-3.6b-instruction-sft]" in _row(text, "--model")
    if command in ("ask", "chat", "batch"):
        assert "0 = greedy. [default: 0.7]" in _row(text, "--temperature")
        assert "[default: 128]" in _row(text, "--max-new-tokens")
        assert "[default: auto]" in _row(text, "--device")
        assert "[default: -1]" in _row(text, "--seed")
    assert "config.toml and RINNA_* variables override them" in text


def test_ask_help_switches(env):
    text = rinna(env, "ask", "--help").stdout.decode("utf-8")
    for switch in ("--json", "--stats", "--show-prompt"):
        assert re.search(rf"│ {switch}\s{{2,}}[A-Z]", _row(text, switch)), _row(text, switch)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="a device that is always full")
@pytest.mark.parametrize(
    ("args", "output", "line"),
    [
        (["ask", "-t", "0", "世界で一番高い山は?"], "full", "rinna: error: cannot write the output (No space left on device)"),
        (["tokenize", "こんにちは"], "full", "rinna: error: cannot write the output (No space left on device)"),
        (["ask", "-t", "0", "世界で一番高い山は?"], "closed", "rinna: error: standard output is closed"),
        (["batch", "-o", "/nonexistent/out.jsonl"], "full", "rinna: error: /nonexistent/out.jsonl: No such file or directory"),
    ],
    ids=["ask-full-disk", "tokenize-full-disk", "ask-closed", "batch-no-folder"],
)  # fmt: skip
def test_output_that_cannot_be_written_is_one_line_and_exit_1(env, memorized_model, args, output, line):
    """Used to end in a traceback (OSError from the stream, or ``'NoneType' object has no attribute 'write'``)."""
    command = [*RINNA, *args, "-m", str(memorized_model)]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(command, input="世界で一番高い山は?\n".encode(), stdout=full if output == "full" else None,
                              stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=120,
                              **({"pass_fds": ()} if output == "full" else {"preexec_fn": lambda: os.close(1)}))  # fmt: skip
    assert (done.returncode, done.stderr.decode()) == (1, line + "\n")
