"""`rinna tokenize`, run as a real process against a folder holding only spiece.model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from rinna_cli.tokenizer import Tokenizer
from tests.fixtures.models import TINY_CORPUS, train_spm

TEXT = "吾輩は猫である"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    (path / "spiece.model").write_bytes(train_spm(TINY_CORPUS, vocab_size=600))
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("env")
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RINNA_", "HF_", "HUGGINGFACE_")) and key != "TRANSFORMERS_CACHE"
    }
    environ.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(base / "hf"),
        RINNA_CLI_HOME=str(base / "home"),
        PYTHONIOENCODING="utf-8",
    )
    return environ


def rinna(env, *args, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "rinna_cli", "tokenize", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=env,
        timeout=60,
    )


def one_error_line(result, exit_code: int) -> str:
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == exit_code, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rinna: error: ")
    return lines[0]


def test_json(env, folder, tok):
    result = rinna(env, "--model", str(folder), "--json", TEXT)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    out = result.stdout.decode("utf-8")
    assert out.endswith("}\n") and out.count("\n") == 1
    data = json.loads(out)
    assert list(data) == ["text", "tokens", "ids", "count"]
    ids = tok.encode(TEXT)
    assert data == {"text": TEXT, "tokens": tok.pieces(ids), "ids": ids, "count": len(ids)}
    assert data["tokens"] == ["吾輩は", "猫である"]  # no leading "▁"
    assert TEXT in out  # not \u-escaped


def test_count(env, folder, tok):
    result = rinna(env, "--model", str(folder), "--count", TEXT)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == f"{len(tok.encode(TEXT))}\n".encode()
    assert result.stdout == b"2\n"


@pytest.mark.parametrize("where", ["argument", "stdin"])
def test_a_leading_byte_order_mark_is_dropped(env, folder, tok, where):
    """``"$(cat notepad.txt)"`` starts with U+FEFF, which was tokenized as three byte pieces."""
    marked = "\ufeff" + TEXT
    args, stdin = ([marked], b"") if where == "argument" else ([], marked.encode())
    result = rinna(env, "--model", str(folder), "--json", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["ids"] == tok.encode(TEXT)


@pytest.mark.parametrize("args", [[], ["-"]], ids=["no-arg", "dash"])
def test_text_from_stdin_drops_the_trailing_newline(env, folder, tok, args):
    result = rinna(env, "--model", str(folder), "--json", *args, stdin=f"{TEXT}\n".encode())
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["text"] == TEXT
    assert data["ids"] == tok.encode(TEXT)
    assert tok.special.nl not in data["ids"]


def test_stdin_inner_newlines_become_nl(env, folder, tok):
    result = rinna(env, "--model", str(folder), "--json", stdin="吾輩は\n猫である\n\n".encode())
    data = json.loads(result.stdout)
    # only the final newline is dropped
    assert data["text"] == "吾輩は<NL>猫である<NL>"
    assert data["tokens"] == ["吾輩は", "<NL>", "猫である", "<NL>"]
    assert data["ids"].count(tok.special.nl) == 2


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_newline_in_argument_is_one_nl_token(env, folder, tok, newline):
    result = rinna(env, "--model", str(folder), "--json", f"吾輩は{newline}猫である")
    data = json.loads(result.stdout)
    assert data["text"] == "吾輩は<NL>猫である"
    assert data["tokens"] == ["吾輩は", "<NL>", "猫である"]
    assert data["ids"] == [tok.sp.piece_to_id("吾輩は"), tok.special.nl, tok.sp.piece_to_id("猫である")]
    assert data["count"] == 3


def test_piped_stdout_is_tab_separated(env, folder, tok):
    text = "  猫🍣 "
    result = rinna(env, "--model", str(folder), text)
    assert result.returncode == 0, result.stderr.decode()
    ids = tok.encode(text)
    expected = "".join(f"{i}\t{piece}\t{pid}\n" for i, (piece, pid) in enumerate(zip(tok.pieces(ids), ids)))
    assert result.stdout.decode("utf-8") == expected
    assert expected.startswith("0\t▁\t") and "\t<0xF0>\t" in expected


def test_missing_folder(env, tmp_path):
    missing = tmp_path / "no-such-model"
    line = one_error_line(rinna(env, "--model", str(missing), TEXT), 1)
    assert str(missing) in line


def test_folder_without_spiece_model(env, tmp_path):
    line = one_error_line(rinna(env, "--model", str(tmp_path), TEXT), 1)
    assert str(tmp_path) in line and "spiece.model" in line


def test_hub_id_not_cached_offline(env):
    line = one_error_line(rinna(env, "--model", "someone/not-cached", TEXT), 1)
    assert "someone/not-cached" in line
    assert "HF_HUB_OFFLINE" in line or "--model" in line


def test_alias_offline(env):
    line = one_error_line(rinna(env, "--model", "sft", TEXT), 1)
    assert "rinna/japanese-gpt-neox-3.6b-instruction-sft" in line
    assert "HF_HUB_OFFLINE" in line or "--model" in line


def test_invalid_utf8_on_stdin(env, folder):
    line = one_error_line(rinna(env, "--model", str(folder), stdin=b"\x8e\xe4\x94y\x82\xcd\n"), 2)
    assert "UTF-8" in line


def test_model_from_environment(env, folder, tok):
    result = rinna({**env, "RINNA_MODEL": str(folder)}, "--count", TEXT)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"2\n"


def test_table_on_a_terminal(env, folder, tok):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rinna_cli", "tokenize", "--model", str(folder), TEXT],
        env={**env, "TERM": "xterm-256color"},
        dimensions=(24, 100),
        encoding="utf-8",
        timeout=30,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = ANSI.sub("", child.before)
    ids = tok.encode(TEXT)
    rows = [line for line in screen.splitlines() if "吾輩は" in line or "猫である" in line]
    assert len(rows) == 2
    for row, piece, pid in zip(rows, tok.pieces(ids), ids):
        assert piece in row and str(pid) in row
    assert "piece" in screen and "id" in screen
    assert "2 tokens" in screen
    assert "\t" not in screen  # not the piped format


def test_terminal_without_text_is_a_usage_error(env, folder):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rinna_cli", "tokenize", "--model", str(folder)],
        env=env,
        dimensions=(24, 100),
        encoding="utf-8",
        timeout=30,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "rinna: error: no text" in ANSI.sub("", child.before)
    assert "Traceback" not in child.before


@pytest.mark.parametrize("args", [["--bogus", TEXT], ["--model"]], ids=["unknown-option", "missing-value"])
def test_option_errors_are_usage_errors(env, folder, args):
    result = rinna(env, *args)
    stderr = result.stderr.decode("utf-8")
    assert "Traceback" not in stderr
    assert result.returncode == 2
    assert result.stdout == b""
