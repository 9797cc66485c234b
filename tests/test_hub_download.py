"""The first run of a hub model, end to end: the real ``rinna`` executable against a hub on loopback.

``tests/hubserver.py`` serves the memorized model in rinna's layout (``HF_ENDPOINT`` points at it),
in three repos: safetensors and a pickle side by side, the pickle only, and safetensors padded past
huggingface_hub's 10 MB download chunk (to cut a download in the middle of a file). Each test gets
an empty Hugging Face cache unless it says otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from rinna_cli.hub import DEMO_MODEL
from tests import prewarmed
from tests.fixtures.memorized_data import CONVERSATIONS
from tests.hubserver import HubServer, Repo

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("rinna")
RINNA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "rinna_cli"]
QUESTION, ANSWER = CONVERSATIONS[3][0]
TOKENIZER = {"spiece.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"}
NOTICE = re.compile(
    r"rinna: downloading (\S+) \((\d+\.\d) (MB|GB)\) into (\S+), once; on a CPU the first start then converts "
    r"the weights to int8 \(about \d+ s, also once\)\. Ctrl-C is safe: run it again to continue\."
)


def _pickle(folder: Path) -> bytes:
    import torch
    from safetensors.torch import load_file

    buffer = io.BytesIO()
    torch.save(load_file(folder / "model.safetensors"), buffer)
    return buffer.getvalue()


def _padded_safetensors(folder: Path, size: int) -> bytes:
    from safetensors.torch import load_file, save

    return save(load_file(folder / "model.safetensors"), metadata={"format": "pt", "padding": "0" * size})


@pytest.fixture(scope="module")
def server(memorized_model):
    tokenizer_and_config = tuple(TOKENIZER)
    pickle = _pickle(memorized_model)
    repos = {
        "rinna/demo": Repo.from_folder(memorized_model, extra={"pytorch_model.bin": pickle, "README.md": b"# demo\n"}),
        "rinna/demo-pickle": Repo.from_folder(memorized_model, only=tokenizer_and_config, extra={"pytorch_model.bin": pickle}),
        "rinna/demo-large": Repo.from_folder(
            memorized_model, only=tokenizer_and_config,
            extra={"model.safetensors": _padded_safetensors(memorized_model, 12 << 20)},
        ),
    }  # fmt: skip
    with HubServer(repos) as hub:
        yield hub


@pytest.fixture
def hub(server):
    server.requests.clear()
    server.hold.clear()
    server.cut.clear()
    server.release.clear()
    server.held.clear()
    yield server
    server.release.set()


@pytest.fixture
def env(tmp_path, server) -> dict:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RINNA_", "HF_", "HUGGINGFACE_", "PYTHON", "TRANSFORMERS_"))
    }
    environ.update(
        HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), RINNA_CLI_HOME=str(tmp_path / "home"),
        OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RINNA_DEVICE="cpu", HF_HUB_DISABLE_TELEMETRY="1",
        RINNA_QUANTIZE="none",  # float32: no quantizing per fresh cache; the first-run test takes the default, int8
    )  # fmt: skip
    return environ


def rinna(env: dict, *args: str) -> subprocess.CompletedProcess:
    return prewarmed.run(
        [*RINNA, *args], stdin=subprocess.DEVNULL, env=env, cwd=ROOT, timeout=180
    )


def fetched(hub) -> list[str]:
    """The files downloaded (GET), in order."""
    return [r["file"] for r in hub.requests if r["method"] == "GET" and r["file"]]


def one_error(result: subprocess.CompletedProcess, code: int) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b"" and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rinna: error: "), stderr
    return lines[0]


def cache_files(env: dict) -> list[Path]:
    return sorted(p for p in Path(env["HF_HOME"]).rglob("*") if p.is_file() or p.is_symlink())


# --- what is fetched ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("tokenize", "--model", "rinna/demo", QUESTION),
        ("ask", "--model", "rinna/demo", "--show-prompt", QUESTION),
        ("ask", "--model", "rinna/demo", "--endpoint", "http://127.0.0.1:9/v1", QUESTION),
    ],
    ids=["tokenize", "show-prompt", "endpoint"],
)
def test_tokenizer_only_commands_fetch_no_weights(hub, env, args):
    result = rinna(env, *args)
    if "--endpoint" in args:
        assert "connection refused" in one_error(result, 1)  # no server there: but no weights fetched either
    else:
        assert result.returncode == 0, result.stderr.decode()
        assert "rinna: downloading" not in result.stderr.decode()
    assert set(fetched(hub)) == TOKENIZER and len(fetched(hub)) == 4


def test_first_run_fetches_safetensors_only_with_one_notice_and_a_clean_stdout(hub, env):
    env.pop("RINNA_QUANTIZE")  # the default: int8 on a CPU, which the notice announces
    result = rinna(env, "ask", "--model", "rinna/demo", "-t", "0", QUESTION)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (ANSWER + "\n").encode()
    notices = [line for line in result.stderr.decode().splitlines() if line.startswith("rinna: downloading")]
    assert len(notices) == 1, result.stderr.decode()
    repo, size, unit, where = NOTICE.fullmatch(notices[0]).groups()
    assert (repo, f"{size} {unit}", where) == ("rinna/demo", "0.5 MB", str(Path(env["HF_HOME"]) / "hub"))
    assert sorted(fetched(hub)) == sorted([*TOKENIZER, "model.safetensors"])  # never pytorch_model.bin, never README


def test_pickle_only_when_the_repo_has_no_safetensors(hub, env):
    result = rinna(env, "ask", "--model", "rinna/demo-pickle", "-t", "0", QUESTION)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (ANSWER + "\n").encode()
    assert sorted(fetched(hub)) == sorted([*TOKENIZER, "pytorch_model.bin"])


def test_later_runs_use_the_cache_online_offline_and_without_a_hub(hub, env):
    assert rinna(env, "ask", "--model", "rinna/demo", "-t", "0", QUESTION).returncode == 0
    hub.requests.clear()
    again = rinna(env, "ask", "--model", "rinna/demo", "-t", "0", QUESTION)
    assert again.stdout == (ANSWER + "\n").encode() and again.stderr == b""  # no notice, no progress bar
    assert fetched(hub) == []
    offline = rinna(dict(env, HF_HUB_OFFLINE="1"), "ask", "--model", "rinna/demo", "-t", "0", QUESTION)
    gone = rinna(dict(env, HF_ENDPOINT="http://127.0.0.1:9"), "ask", "--model", "rinna/demo", "-t", "0", QUESTION)
    for result in (offline, gone):
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == (ANSWER + "\n").encode()
    assert fetched(hub) == []


# --- the errors of a first run ------------------------------------------------------------------


def test_offline_and_not_cached_names_the_two_ways_without_a_download(hub, env):
    line = one_error(rinna(dict(env, HF_HUB_OFFLINE="1"), "ask", "--model", "rinna/demo", QUESTION), 1)
    assert line == (
        "rinna: error: rinna/demo: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; without a "
        "download, generate on a server with --endpoint URL (and --model a local folder holding its tokenizer), or try "
        f"the demo model: --model {DEMO_MODEL}"
    )
    assert hub.requests == []
    # where only the tokenizer is wanted (tokenizing; generating on a server) only a folder holding it is the way
    tokenizer_only = (
        "rinna: error: rinna/demo: its tokenizer is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        f"give --model a local folder holding it (spiece.model and config.json), or try the demo model: --model {DEMO_MODEL}"
    )
    offline = dict(env, HF_HUB_OFFLINE="1")
    assert one_error(rinna(offline, "tokenize", "--model", "rinna/demo", "吾輩"), 1) == tokenizer_only
    endpoint = ("--endpoint", "http://127.0.0.1:9/v1")
    assert one_error(rinna(offline, "ask", *endpoint, "--model", "rinna/demo", QUESTION), 1) == tokenizer_only
    assert one_error(rinna(offline, "ask", "--show-prompt", "--model", "rinna/demo", QUESTION), 1) == tokenizer_only
    assert hub.requests == []


def test_an_unreachable_hub_does_not_blame_hf_hub_offline(hub, env):
    line = one_error(rinna(dict(env, HF_ENDPOINT="http://127.0.0.1:9"), "ask", "--model", "rinna/demo", QUESTION), 1)
    assert "HF_HUB_OFFLINE" not in line
    assert "cannot be reached" in line and "--endpoint URL" in line and f"--model {DEMO_MODEL}" in line


def test_a_mistyped_alias_gets_a_suggestion(hub, env):
    line = one_error(rinna(env, "ask", "--model", "sft-v3", QUESTION), 2)
    assert line.startswith("rinna: error: unknown model 'sft-v3'; did you mean sft-v2? ")
    assert hub.requests == []


def test_an_unknown_repo(hub, env):
    line = one_error(rinna(env, "ask", "--model", "rinna/nope", QUESTION), 1)
    assert line == "rinna: error: rinna/nope: no such model on the Hugging Face hub (or it needs a login)"


# --- interrupted downloads ----------------------------------------------------------------------


def test_a_dropped_connection_resumes_where_it_stopped(hub, env):
    hub.cut["model.safetensors"] = 11 << 20  # past the first 10 MB chunk, which is on disk by then
    result = rinna(env, "ask", "--model", "rinna/demo-large", "-t", "0", QUESTION)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (ANSWER + "\n").encode()
    ranges = [r["range"] for r in hub.downloads("model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2 and re.fullmatch(r"bytes=\d+-", ranges[1]), ranges
    assert int(ranges[1][6:-1]) >= 10 << 20
    data = hub.repos["rinna/demo-large"].files["model.safetensors"]
    blob = next(p for p in cache_files(env) if p.name == "model.safetensors").resolve()
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_ctrl_c_during_the_download_is_safe_and_the_next_run_continues_the_file(hub, env):
    hub.hold["model.safetensors"] = 11 << 20  # past the first 10 MB chunk, which is on disk by then
    proc = prewarmed.popen(
        [*RINNA, "ask", "--model", "rinna/demo-large", "-t", "0", QUESTION],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert hub.held.wait(120), "the download never started"
        time.sleep(0.5)  # the chunk reaches the disk
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and stdout == b"", stderr.decode()
    assert stopped_in < 5, stopped_in  # at once, not when the file is done
    assert stderr.decode().endswith(
        "rinna: download of rinna/demo-large interrupted; run the same command again to continue it\n"
    )
    assert "Traceback" not in stderr.decode()
    hub.hold.clear()
    hub.release.set()
    hub.requests.clear()
    again = rinna(env, "ask", "--model", "rinna/demo-large", "-t", "0", QUESTION)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == (ANSWER + "\n").encode()
    assert fetched(hub) == ["model.safetensors"]  # the tokenizer files were kept
    ranges = [r["range"] for r in hub.downloads("model.safetensors")]
    assert len(ranges) == 1 and re.fullmatch(r"bytes=\d+-", ranges[0] or ""), ranges
    assert int(ranges[0][6:-1]) >= 10 << 20  # the second run continued the file
    data = hub.repos["rinna/demo-large"].files["model.safetensors"]
    blob = next(p for p in cache_files(env) if p.name == "model.safetensors").resolve()
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not [p.name for p in Path(env["HF_HOME"]).rglob("*") if p.name.endswith((".part", ".incomplete"))]


# --- progress on a terminal ---------------------------------------------------------------------


def test_progress_with_sizes_on_a_terminal_and_nothing_on_the_piped_stdout(hub, env):
    """stderr on a terminal (24x100), stdout a pipe: the bars name the file and its size."""
    hub.hold["spiece.model"] = 1000
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [*RINNA, "tokenize", "--model", "rinna/demo", QUESTION],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT,
    )  # fmt: skip
    os.close(slave)
    shown = b""
    try:
        assert hub.held.wait(120)
        deadline = time.monotonic() + 30
        while b"spiece.model" not in shown and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                shown += os.read(master, 65536)
        hub.release.set()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = shown.decode(errors="replace")
    size = len(hub.repos["rinna/demo"].files["spiece.model"])
    assert re.search(rf"spiece\.model: +\d+%.*/{size / 1000:.2f}k", text), text
    assert proc.returncode == 0
    assert stdout.decode().splitlines()[0].split("\t")[0] == "0" and b"%" not in stdout
