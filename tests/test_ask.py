"""`rinna ask` end to end, as a real process on the fixture models.

Two ways to run the command:

* ``rinna(...)``: the installed ``rinna`` executable in a fresh process, as a user runs it: for the
  runs whose point is the real process (a pipeline into ``head -c 5`` and into ``true``, a
  pseudo-terminal, SIGINT, a terminal stdin, a closed stdin) and for one run of every kind of
  outcome, compared byte for byte with the warm runner's in ``test_real_and_warm_runs_agree``.
  The slow ones (weights loaded) start in background threads when the module starts.
* ``warm.run(...)``: ``rinna_cli.cli.run()`` in this process (:class:`InProcessRinna`), with byte
  streams, the run's environment and working folder, and each loaded model kept for the next run
  (its KV cache emptied); ~80 runs take about what one process start does. Only a stdout whose
  reader is gone (``stdout="closed-pipe"``) needs a real file descriptor: that run is forked from a
  server that imported torch and transformers once (:class:`WarmRinna`).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rinna_cli.errors import UsageError
from rinna_cli.inputs import check_text, compose_question, escaped, read_stdin
from rinna_cli.prompt import encode_newlines
from rinna_cli.session import Conversation
from rinna_cli.tokenizer import Tokenizer
from tests import prewarmed
from tests.fixtures.memorized_data import (
    BYTE_FALLBACK_CHARS,
    CONVERSATIONS,
    SIGHTSEEING_A,
    SIGHTSEEING_Q,
)
from tests.helpers import RINNA, process_env

ROOT = Path(__file__).resolve().parent.parent
FOOD_Q, FOOD_A = CONVERSATIONS[2][0]
CAT_Q, CAT_A = CONVERSATIONS[3][0]
FIRST_TURNS = [turns[0] for turns in CONVERSATIONS]
JSON_KEYS = ["reply", "model", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s", "tokens_per_s"]
STATS = re.compile(
    r"^(\d+) tokens, prompt (\d+) \((\d+) prefilled\), first token \d+\.\d\d s, \d+\.\d tokens/s(?:, .+)?$"
)


# --- running the command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("ask_env")
    return process_env(
        base / "hf",
        base / "home",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        RINNA_DEVICE="cpu",  # the same device (and dtype) on a machine with a GPU; engine tests cover "auto"
    )


def rinna(env: dict, *args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real executable; ``stdin=None`` is /dev/null (not a terminal, nothing in it)."""
    return subprocess.run(
        [*RINNA, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


_SERVER = r"""
import json, os, signal, sys, traceback

import rinna_cli.cli
import rinna_cli.engine  # torch and transformers: the slow part of every run, done once here
import transformers.models.gpt_neox.modeling_gpt_neox  # what from_pretrained imports on first use


def child(job):
    if job["stdin"] == "closed":
        os.close(0)
    else:
        fd = os.open(job["stdin"] or os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
    if job["stdout"] == "closed-pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.dup2(write_end, 1)
        os.close(write_end)
    else:
        fd = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.close(fd)
    fd = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdin = None if job["stdin"] == "closed" else open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.argv = ["rinna", *job["args"]]
    code = 0
    try:
        rinna_cli.cli.main()
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
    except BaseException:
        print("Exception ignored while flushing sys.stdout", file=sys.stderr)
        traceback.print_exc()
        code = 120
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(job)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(70)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class WarmRinna:
    """Runs ``rinna`` as processes forked from a server that has torch and transformers imported."""

    def __init__(self, env: dict, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.count = 0
        self.server_err = open(workdir / "server.err", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.server_err,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self._buffer = b""

    def _message(self, timeout: float, pid: int | None = None) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(remaining, 0))[0] if remaining > 0 else []
            if not ready:
                if pid:
                    os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"warm rinna: no answer in {timeout} s")
            data = os.read(fd, 4096)
            if not data:
                self.server_err.flush()
                raise RuntimeError(f"warm rinna server died: {(self.workdir / 'server.err').read_text()[-3000:]}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, *args: str, stdin: bytes | str | None = None, stdout: str | None = None, timeout: float = 120):
        """``stdin``: bytes, None (/dev/null) or "closed"; ``stdout``: None (a file) or "closed-pipe"."""
        self.count += 1
        base = self.workdir / f"run{self.count}"
        stdin_path = None
        if isinstance(stdin, bytes):
            stdin_path = str(base.with_suffix(".in"))
            Path(stdin_path).write_bytes(stdin)
        job = {
            "args": list(args),
            "stdin": "closed" if stdin == "closed" else stdin_path,
            "stdout": stdout or str(base.with_suffix(".out")),
            "stderr": str(base.with_suffix(".err")),
            "env": self.env,
            "cwd": str(ROOT),
        }
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._message(300)["pid"]  # the first run waits for the server's imports
        code = self._message(timeout, pid)["code"]
        out = b"" if stdout else base.with_suffix(".out").read_bytes()
        return subprocess.CompletedProcess(["rinna", *args], code, out, base.with_suffix(".err").read_bytes())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.server_err.close()


class InProcessRinna:
    """Runs ``rinna`` through ``rinna_cli.cli.run`` here: same arguments, streams as bytes, same environment."""

    def __init__(self, env: dict, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.engines: dict[tuple, object] = {}
        self.forked: WarmRinna | None = None

    def _open_engine(self, env, settings, tokenizer, window):
        from rinna_cli.environment import load_engine, open_engine

        if settings.endpoint:
            return open_engine(env, settings, tokenizer, window)
        key = (settings.model, settings.device, settings.dtype, settings.quantize)
        if key not in self.engines:
            self.engines[key] = load_engine(env, settings, tokenizer)
        engine = self.engines[key]
        engine.forget()  # every run starts with an empty KV cache, as a new process does
        return engine

    def run(self, *args: str, stdin: bytes | str | None = None, stdout: str | None = None, timeout: float = 120):
        """``stdin``: bytes, None (/dev/null) or "closed"; ``stdout``: None (bytes) or "closed-pipe" (forked)."""
        if stdout == "closed-pipe":
            self.forked = self.forked or WarmRinna(self.env, self.workdir)
            return self.forked.run(*args, stdin=stdin, stdout=stdout, timeout=timeout)
        from rinna_cli import cli
        from rinna_cli.environment import Environment

        source = None if stdin == "closed" else io.BytesIO(stdin if isinstance(stdin, bytes) else b"")
        out, err = io.BytesIO(), io.BytesIO()
        streams = {
            "stdin": None if source is None else io.TextIOWrapper(source, encoding="utf-8"),
            "stdout": io.TextIOWrapper(out, encoding="utf-8"),
            "stderr": io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace"),
        }
        saved, cwd = dict(os.environ), os.getcwd()
        os.environ.clear()
        os.environ.update(self.env)
        os.chdir(ROOT)
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(1)  # the environment's OMP_NUM_THREADS=1, which torch read at import
        try:
            env = Environment(**streams, environ=dict(self.env), open_engine=self._open_engine)
            code = cli.run(list(args), env)
            streams["stdout"].flush()
            streams["stderr"].flush()
        finally:
            if torch:
                torch.set_num_threads(threads)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)
        return subprocess.CompletedProcess(["rinna", *args], code, out.getvalue(), err.getvalue())

    def close(self):
        if self.forked:
            self.forked.close()


def _selected(request, uses: str | None = None) -> set[str]:
    """Names of this module's tests that this pytest run will run (those taking the ``uses`` argument)."""
    return {
        item.originalname
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and (uses is None or uses in inspect.signature(item.function).parameters)
    }


@pytest.fixture(scope="module", autouse=True)
def warm(request, env, tmp_path_factory):
    """The in-process runner (its forked helper starts on first use)."""
    if not _selected(request, "warm"):
        yield None
        return
    runner = InProcessRinna(env, tmp_path_factory.mktemp("warm"))
    yield runner
    runner.close()


def bash(env: dict, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, env=env, cwd=ROOT, timeout=180)


def interrupted_run(env: dict, folder: str) -> tuple[int, bytes, bytes, bytes]:
    """``rinna ask`` on the random model, SIGINT as soon as stdout shows something: (code, first, rest, stderr)."""
    # Greedy on the random model never emits </s>: 1900 tokens would take seconds.
    args = ["ask", "--model", folder, "--max-new-tokens", "1900", "-t", "0", "こんにちは"]
    proc = subprocess.Popen(
        [*RINNA, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT
    )
    try:
        if not select.select([proc.stdout], [], [], 150)[0]:
            raise AssertionError("no output within 150 s")
        first = os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, first, rest, stderr


def _pipeline(model: str, reader: str) -> str:
    return f"{shlex.join([*RINNA, 'ask', '--model', model, '-t', '0', CAT_Q])} < /dev/null | {reader}"


def _quantized_once(env: dict, folder: Path) -> None:
    """The int8 weights, kernel probe and plan of ``folder`` in ``env``'s cache, made here and now: the runs
    below then start as every start after a user's first does, instead of each quantizing at once."""
    from transformers import AutoConfig

    from rinna_cli.quantized import load_quantized

    cache = Path(env["RINNA_CLI_HOME"]) / "cache"
    load_quantized(folder, [folder / "model.safetensors"], AutoConfig.from_pretrained(folder), cache, "int8")


@pytest.fixture(scope="module", autouse=True)
def slow(request, env, memorized_model) -> dict:
    """The real runs that load weights (~4.5 s each), started at once in the background."""
    model = str(memorized_model)
    selected = _selected(request)
    jobs: dict = {}
    on_the_memorized_model = {"test_reply_on_a_terminal", "test_real_executable_prints_exactly_the_reply", "test_head_ends_quietly"}  # fmt: skip
    if selected & on_the_memorized_model:
        _quantized_once(env, memorized_model)
    if "test_reply_on_a_terminal" in selected:
        # on a pty of its own (forked by the prewarmed server); read by the test
        pytest.importorskip("pexpect")
        jobs["pty"] = prewarmed.spawn(
            RINNA[0], [*RINNA[1:], "ask", "--model", model, "-t", "0", FOOD_Q],
            env=env, cwd=str(ROOT), dimensions=(24, 120), timeout=300,
        )  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        if selected & {"test_real_executable_prints_exactly_the_reply", "test_real_and_warm_runs_agree"}:
            jobs["reply"] = pool.submit(rinna, env, "ask", "--model", model, "--temperature", "0", SIGHTSEEING_Q)
        if "test_head_ends_quietly" in selected:
            jobs["head"] = pool.submit(bash, env, _pipeline(model, "head -c 5"))
        if "test_sigint_stops_generation_keeps_the_output_and_exits_130" in selected:
            tiny_model = request.getfixturevalue("tiny_model")  # built while the others run
            jobs["sigint"] = pool.submit(interrupted_run, env, str(tiny_model))
        yield jobs
    if "pty" in jobs and jobs["pty"].isalive():
        jobs["pty"].close(force=True)


# --- models and checks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(memorized_model) -> str:
    return str(memorized_model)


@pytest.fixture(scope="module")
def tok(memorized_model) -> Tokenizer:
    return Tokenizer.from_folder(memorized_model)


@pytest.fixture(scope="module")
def no_weights(memorized_model, tmp_path_factory) -> str:
    """The memorized model's tokenizer files and config.json, and no weights at all."""
    folder = tmp_path_factory.mktemp("no_weights")
    for name in ("spiece.model", "config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(memorized_model / name, folder / name)
    return str(folder)


def prompt_ids(tok: Tokenizer, question: str) -> list[int]:
    conversation = Conversation(tok)
    conversation.add_user(question)
    return conversation.prompt_ids()


def ok(result: subprocess.CompletedProcess) -> str:
    """Exit 0, nothing on stderr, no terminal codes on stdout; the stdout text."""
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b"", result.stderr.decode(errors="replace")
    assert b"\x1b" not in result.stdout
    return result.stdout.decode("utf-8")


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """Exit ``code`` with exactly one line on stderr, ``rinna: error: ...``, and nothing on stdout."""
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == code, (result.returncode, stderr)
    assert result.stdout == b""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("rinna: error: "), stderr
    return lines[0]


# --- the reply on a pipe -------------------------------------------------------------------


@pytest.mark.parametrize("question, answer", FIRST_TURNS, ids=[q for q, _ in FIRST_TURNS])
def test_reply_is_byte_exact(warm, model, question, answer):
    result = warm.run("ask", "--model", model, "--temperature", "0", question)
    assert result.stdout == (answer + "\n").encode("utf-8")
    ok(result)


def test_byte_fallback_characters_come_out_whole(warm, model):
    text = ok(warm.run("ask", "--model", model, "-t", "0", FOOD_Q))
    assert text == FOOD_A + "\n"
    assert all(char in text for char in BYTE_FALLBACK_CHARS) and "\ufffd" not in text


@pytest.mark.parametrize(
    "question, answer, form",
    [
        (SIGHTSEEING_Q, SIGHTSEEING_A, "echo"),
        (FOOD_Q, FOOD_A, "echo"),
        (SIGHTSEEING_Q, SIGHTSEEING_A, "dash"),
        (FOOD_Q, FOOD_A, "crlf"),
        (SIGHTSEEING_Q, SIGHTSEEING_A, "spaces"),
    ],
)
def test_question_on_stdin(warm, model, question, answer, form):
    stdin = {
        "echo": f"{question}\n",
        "dash": f"{question}\n",
        "crlf": f"{question}\r\n",
        "spaces": f"  \n{question}  \n\n",
    }[form].encode("utf-8")
    args = ["ask", "--model", model, "--temperature", "0"] + (["-"] if form == "dash" else [])
    result = warm.run(*args, stdin=stdin)
    assert result.stdout == (answer + "\n").encode("utf-8")
    ok(result)


def test_closed_stdin_with_an_argument(warm, model):
    result = warm.run("ask", "--model", model, "-t", "0", SIGHTSEEING_Q, stdin="closed")
    assert ok(result) == SIGHTSEEING_A + "\n"


def test_closed_stdin_without_a_question(env, model):
    result = bash(env, f"{shlex.join([*RINNA, 'ask', '--model', model])} <&-")
    assert "empty" in error_line(result, 2)


def test_json(warm, model, tok):
    result = warm.run("ask", "--model", model, "--temperature", "0", "--json", SIGHTSEEING_Q)
    text = ok(result)
    assert text.endswith("}\n") and text.count("\n") == 1
    data = json.loads(text)
    assert list(data) == [*JSON_KEYS, "kernels"]  # the local int8 engine says which kernels ran
    assert data["kernels"].startswith("int8 decode ") and ", prefill " in data["kernels"]
    ids = prompt_ids(tok, SIGHTSEEING_Q)
    reply_ids = tok.encode(encode_newlines(SIGHTSEEING_A))
    assert data["reply"] == SIGHTSEEING_A
    assert data["model"] == model
    assert data["prompt_tokens"] == len(ids)
    assert data["completion_tokens"] == len(reply_ids) + 1  # the memorized ids, then </s>
    assert data["finish_reason"] == "stop"
    assert isinstance(data["ttft_s"], float) and 0 <= data["ttft_s"] < 60
    assert isinstance(data["tokens_per_s"], float) and data["tokens_per_s"] > 0


def test_json_keeps_byte_fallback_characters(warm, model):
    data = json.loads(ok(warm.run("ask", "--model", model, "-t", "0", "--json", FOOD_Q)))
    assert data["reply"] == FOOD_A and data["finish_reason"] == "stop"


def test_json_length(warm, model):
    result = warm.run("ask", "--model", model, "-t", "0", "--max-new-tokens", "3", "--json", SIGHTSEEING_Q)
    data = json.loads(ok(result))
    assert list(data) == [*JSON_KEYS, "kernels"]
    assert data["finish_reason"] == "length" and data["completion_tokens"] == 3
    assert data["reply"] and SIGHTSEEING_A.startswith(data["reply"])


def test_max_new_tokens_cuts_the_plain_reply(warm, model):
    text = ok(warm.run("ask", "--model", model, "-t", "0", "-n", "3", SIGHTSEEING_Q))
    assert text.endswith("\n") and SIGHTSEEING_A.startswith(text[:-1]) and len(text) > 1


def test_stats_on_stderr_only(warm, model, tok):
    result = warm.run("ask", "--model", model, "-t", "0", "--stats", CAT_Q)
    assert result.returncode == 0
    assert result.stdout == (CAT_A + "\n").encode("utf-8")
    lines = result.stderr.decode("utf-8").splitlines()
    assert len(lines) == 1, lines
    match = STATS.match(lines[0])
    assert match, lines[0]
    assert "tokens" in lines[0] and "first token" in lines[0] and "tokens/s" in lines[0]
    completion, prompt, prefilled = map(int, match.groups())
    assert completion == len(tok.encode(encode_newlines(CAT_A))) + 1
    assert prompt == prefilled == len(prompt_ids(tok, CAT_Q))
    assert b"\x1b" not in result.stderr


def test_stats_with_json(warm, model):
    result = warm.run("ask", "--model", model, "-t", "0", "--stats", "--json", SIGHTSEEING_Q)
    assert result.returncode == 0
    assert json.loads(result.stdout)["reply"] == SIGHTSEEING_A
    assert STATS.match(result.stderr.decode().strip())


# --- instruction + material, --show-prompt -----------------------------------------------------


def show_prompt(warm, folder, *args, stdin=None):
    return warm.run("ask", "--model", folder, "--show-prompt", *args, stdin=stdin)


def test_show_prompt_instruction_and_material(warm, no_weights, tok):
    material = "  記事の一行目\r\n二行目\n\n三行目\n"
    result = show_prompt(warm, no_weights, "三行で要約してください。", stdin=material.encode())
    prompt = "ユーザー: 三行で要約してください。<NL><NL>記事の一行目<NL>二行目<NL><NL>三行目<NL>システム: "
    assert result.stdout == (prompt + "\n").encode("utf-8")
    assert result.returncode == 0  # with no weights in the folder: nothing was loaded
    count = len(tok.encode(prompt))
    assert count == len(prompt_ids(tok, "三行で要約してください。\n\n記事の一行目\n二行目\n\n三行目"))
    assert result.stderr.decode() == f"{count} tokens\n"


@pytest.mark.parametrize(
    "args, stdin, question",
    [
        ((SIGHTSEEING_Q,), None, SIGHTSEEING_Q),
        ((), f"{SIGHTSEEING_Q}\n".encode(), SIGHTSEEING_Q),
        (("-",), f"{SIGHTSEEING_Q}\n".encode(), SIGHTSEEING_Q),
        (("一行目\n二行目",), None, "一行目\n二行目"),
        (("指示",), "資料".encode(), "指示\n\n資料"),
        (("指示",), b"   \n", "指示"),  # blank material: just the instruction
        (("  ",), "資料\n".encode(), "資料"),  # blank instruction: just the material
    ],
)
def test_show_prompt_forms(warm, no_weights, tok, args, stdin, question):
    result = show_prompt(warm, no_weights, *args, stdin=stdin)
    prompt = "ユーザー: " + encode_newlines(question) + "<NL>システム: "
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8") == prompt + "\n"
    assert result.stderr.decode() == f"{len(prompt_ids(tok, question))} tokens\n"
    assert len(prompt_ids(tok, question)) == len(tok.encode(prompt))


def test_show_prompt_of_a_long_question_is_shown_not_refused(warm, no_weights):
    result = show_prompt(warm, no_weights, "吾輩は猫である。" * 600)
    assert result.returncode == 0 and result.stdout.startswith("ユーザー: 吾輩".encode())


def test_instruction_and_material_reach_the_model(warm, model):
    """With stdin and an argument the question is "argument, blank line, stdin": not the memorized one."""
    alone = ok(warm.run("ask", "--model", model, "-t", "0", "--json", SIGHTSEEING_Q))
    both = ok(warm.run("ask", "--model", model, "-t", "0", "--json", SIGHTSEEING_Q, stdin="資料\n".encode()))
    assert json.loads(alone)["reply"] == SIGHTSEEING_A
    assert json.loads(both)["prompt_tokens"] > json.loads(alone)["prompt_tokens"]


# --- usage errors: exit 2, one line ------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   ", "\n\t \n", "\u3000"])
def test_empty_question_argument(warm, model, question):
    assert "empty" in error_line(warm.run("ask", "--model", model, question), 2)


@pytest.mark.parametrize("stdin", [b"", b"   \n", b"\n\n\t\r\n"])
def test_empty_question_on_stdin(warm, model, stdin):
    assert "empty" in error_line(warm.run("ask", "--model", model, stdin=stdin), 2)


def test_empty_argument_and_empty_stdin(warm, model):
    assert "empty" in error_line(warm.run("ask", "--model", model, "  ", stdin=b" \n"), 2)


def test_no_question_on_a_terminal(env, model):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(RINNA[0], [*RINNA[1:], "ask", "--model", model], env=env, cwd=str(ROOT), dimensions=(24, 120))
    output = child.read().decode("utf-8")
    child.close()
    assert child.exitstatus == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rinna: error:") and "no question" in lines[0]


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("--temperature", "-1", "0.0 <= temperature <= 5.0"),
        ("--top-p", "1.5", "0.0 < top_p <= 1.0"),
        ("--top-k", "-3", "0 <= top_k <= 100000"),
        ("--repetition-penalty", "0", "0.0 < repetition_penalty"),
        ("--max-new-tokens", "0", "1 <= max_new_tokens"),
        ("--max-new-tokens", "5000", "1 <= max_new_tokens <= 2047"),
        ("-n", "2048", "1 <= max_new_tokens <= 2047"),
        ("--seed", "-2", "-1 <= seed"),
    ],
)
def test_out_of_range_options(warm, model, option, value, allowed):
    line = error_line(warm.run("ask", "--model", model, option, value, "質問"), 2)
    assert "out of range" in line and allowed in line, line


def test_question_longer_than_the_window(warm, model, tok):
    question = "吾輩は猫である。" * 700
    size = len(prompt_ids(tok, question))
    assert size > 2048
    line = error_line(warm.run("ask", "--model", model, "-n", "100", question), 2)
    assert f"{size} tokens" in line and "at most 1948" in line and "2048" in line, line


def test_long_material_on_stdin(warm, model, tok):
    material = "吾輩は猫である。" * 1000  # 24 kB: under the byte limit, over the token window
    size = len(prompt_ids(tok, "要約して\n\n" + material))
    assert size > 2048
    line = error_line(warm.run("ask", "--model", model, "要約して", stdin=material.encode()), 2)
    assert f"{size} tokens" in line and "at most 1920" in line, line


def _question_of(tok: Tokenizer, size: int) -> str:
    """A question whose prompt is exactly ``size`` tokens."""
    unit = "吾輩は猫である。"
    per_unit = len(tok.encode(unit * 2)) - len(tok.encode(unit))
    most = (size - len(prompt_ids(tok, ""))) // per_unit + 1
    for units in range(most, 0, -1):
        for pad in range(4 * per_unit):
            question = unit * units + "。" * pad
            if len(prompt_ids(tok, question)) == size:
                return question
    raise AssertionError(f"no question of {size} tokens")


def test_window_boundary(warm, model, tok):
    """With -n 1 a prompt of 2047 tokens fits the 2048-token window exactly; 2048 does not."""
    fits = _question_of(tok, 2047)
    result = warm.run("ask", "--model", model, "-t", "0", "-n", "1", "--json", fits)
    data = json.loads(ok(result))
    assert data["prompt_tokens"] == 2047 and data["completion_tokens"] == 1
    too_long = _question_of(tok, 2048)
    line = error_line(warm.run("ask", "--model", model, "-n", "1", too_long), 2)
    assert "2048 tokens" in line and "at most 2047" in line


def test_a_megabyte_on_stdin_is_refused_quickly(env, model, tok):
    started = time.monotonic()
    result = rinna(env, "ask", "--model", model, stdin=b"\xe3\x81\x82" * 350000, timeout=60)
    elapsed = time.monotonic() - started
    line = error_line(result, 2)
    assert "standard input is over" in line and "bytes" in line, line
    room = 2048 - 128 - len(prompt_ids(tok, ""))  # the README's promise: how many tokens fit
    assert f"with max_new_tokens = 128 at most {room:,} tokens of it fit: pass a shorter text" in line, line
    assert elapsed < 20, elapsed


def test_a_megabyte_with_an_instruction_is_refused_too(warm, model):
    line = error_line(warm.run("ask", "--model", model, "要約して", stdin=b"a" * 1_000_000), 2)
    assert "standard input is over" in line


@pytest.mark.parametrize("data", [b"\x82\xa0", "日本語".encode("euc_jp"), b"ok \xff"])
def test_stdin_that_is_not_utf8(warm, model, data):
    line = error_line(warm.run("ask", "--model", model, stdin=data), 2)
    assert "UTF-8" in line and "iconv" in line, line


def test_stdin_not_utf8_with_an_argument(warm, model):
    line = error_line(warm.run("ask", "--model", model, "要約して", stdin="資料".encode("shift_jis")), 2)
    assert "UTF-8" in line and "iconv" in line


# --- runtime errors: exit 1, one line naming the folder -------------------------------------------


def test_missing_model_folder(warm, tmp_path):
    folder = tmp_path / "nowhere"
    line = error_line(warm.run("ask", "--model", str(folder), "質問"), 1)
    assert str(folder) in line


def test_folder_of_another_model_type(warm, memorized_model, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(memorized_model, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    line = error_line(warm.run("ask", "--model", str(folder), "質問"), 1)
    assert str(folder) in line and "llama" in line


@pytest.mark.parametrize("size", [10, 100_000])
def test_truncated_weights(warm, memorized_model, tmp_path, size):
    folder = tmp_path / "cut"
    shutil.copytree(memorized_model, folder)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(size)
    line = error_line(warm.run("ask", "--model", str(folder), "-t", "0", SIGHTSEEING_Q), 1)
    assert str(folder) in line


def test_folder_without_weights(warm, no_weights):
    line = error_line(warm.run("ask", "--model", no_weights, "質問"), 1)
    assert no_weights in line and "weights" in line


# --- the reader of stdout goes away ------------------------------------------------------------


def test_true_ends_quietly(env, no_weights):
    """``| true`` with the real executable; --show-prompt writes its whole output at exit, where a closed
    pipe used to give "Exception ignored ... BrokenPipeError" and exit 120. (Generating runs into a
    pipe nobody reads: test_closed_stdout_is_success.)"""
    for _ in range(3):
        command = f"{shlex.join([*RINNA, 'ask', '--model', no_weights, '--show-prompt', CAT_Q])} < /dev/null | true"
        result = bash(env, command)
        assert result.returncode == 0 and re.fullmatch(rb"\d+ tokens\n", result.stderr), result.stderr.decode()


@pytest.mark.parametrize("extra", [(), ("--json",), ("--stats",)])
def test_closed_stdout_is_success(warm, model, extra):
    """README: exit 0 when the reader of stdout goes away; nothing on stderr but --stats' line."""
    result = warm.run("ask", "--model", model, "-t", "0", *extra, CAT_Q, stdout="closed-pipe")
    assert result.returncode == 0, result.stderr.decode()
    assert "Traceback" not in result.stderr.decode() and "Broken" not in result.stderr.decode()
    if not extra or extra == ("--json",):
        assert result.stderr == b""
    else:  # the partial reply's: generating stopped when the reader went away
        assert re.fullmatch(rb"\d+ tokens, prompt \d+ \(\d+ prefilled\), first token .* tokens/s.*\n", result.stderr), result.stderr


def test_closed_stdout_show_prompt(env, no_weights):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*RINNA, "ask", "--model", no_weights, "--show-prompt", "質問"],
            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert result.stderr.decode().endswith(" tokens\n") and result.stderr.decode().count("\n") == 1


# --- seeds ------------------------------------------------------------------------------------


def test_same_seed_same_reply_different_seed_different(warm, tiny_model):
    def sample(seed: str) -> bytes:
        result = warm.run("ask", "--model", str(tiny_model), "-t", "0.9", "-n", "40", "--seed", seed, "こんにちは")
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.endswith(b"\n")
        return result.stdout

    first = sample("1234")
    assert sample("1234") == first
    assert sample("1235") != first


# --- inputs.py, unit ----------------------------------------------------------------------------


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size=-1):
        self.asked.append(size)
        return super().read(size)


def test_read_stdin_reads_at_most_limit_plus_one_bytes():
    stream = CountingStream(b"a" * 1_000_000)
    with pytest.raises(UsageError) as caught:
        read_stdin(1000, stream)
    assert stream.asked == [1001] and stream.tell() == 1001
    assert "1,000 bytes" in str(caught.value)


def test_read_stdin_limit_is_inclusive():
    assert read_stdin(6, io.BytesIO("あい".encode())) == "あい"
    with pytest.raises(UsageError):
        read_stdin(5, io.BytesIO("あい".encode()))


@pytest.mark.parametrize(
    "data, offset", [(b"\x82\xa0", 0), ("あ".encode() + b"\xff", 3), ("あ".encode()[:2], 0)]
)
def test_read_stdin_refuses_non_utf8(data, offset):
    with pytest.raises(UsageError) as caught:
        read_stdin(100, io.BytesIO(data))
    message = str(caught.value)
    assert "UTF-8" in message and "iconv" in message and f"offset {offset}" in message


def test_read_stdin_drops_a_utf8_byte_order_mark_and_counts_offsets_with_it():
    assert read_stdin(100, io.BytesIO(b"\xef\xbb\xbf" + "猫".encode())) == "猫"
    with pytest.raises(UsageError, match=r"byte 0xff at offset 4\);"):
        read_stdin(100, io.BytesIO(b"\xef\xbb\xbfa\xff"))


@pytest.mark.parametrize(
    "mark, name",
    [(b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32")],
)
def test_read_stdin_names_utf16_and_utf32(mark, name):
    with pytest.raises(UsageError) as caught:
        read_stdin(100, io.BytesIO(mark + "猫".encode("utf-16-le")))
    assert str(caught.value) == f"standard input is {name}, not UTF-8; convert it first, e.g. `iconv -f {name} -t UTF-8`"


def test_check_text_refuses_surrogates_and_escaped_shows_them():
    check_text("--model", "rinna/japanese 🍣")  # UTF-8: nothing to say
    with pytest.raises(UsageError, match=r"^--model is not UTF-8 \(byte 0xed at offset 0 of '\\xed\\xa0\\x80'\)"):
        check_text("--model", "\ud800")  # a surrogate no bytes made (JSON "\ud800"): still refused, no crash
    assert escaped("a\udc80🍣") == "a\\x80🍣" and escaped("猫") == "猫"


def test_read_stdin_keeps_text_as_is():
    text = "  一行目\r\n二行目\n🍣𠮷\t\n"
    assert read_stdin(100, io.BytesIO(text.encode())) == text
    assert read_stdin(100, io.BytesIO(b"")) == ""


def test_read_stdin_with_stdin_closed(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    assert read_stdin(100) == ""


@pytest.mark.parametrize(
    "argument, piped, question",
    [
        ("質問", None, "質問"),
        (None, "質問\n", "質問"),
        ("指示", "資料\n", "指示\n\n資料"),
        ("  指示 ", "\n 資料\n二行目 \n\n", "指示\n\n資料\n二行目"),
        ("指示", "  \n", "指示"),
        ("  ", "資料", "資料"),
    ],
)
def test_compose_question(argument, piped, question):
    assert compose_question(argument, piped) == question


@pytest.mark.parametrize("argument, piped", [(None, None), ("", None), ("  ", "\n"), (None, " \r\n\t")])
def test_compose_question_refuses_empty(argument, piped):
    with pytest.raises(UsageError):
        compose_question(argument, piped)


# --- the real executable: these wait for the background runs, so they come last -----------------


def test_real_executable_prints_exactly_the_reply(slow):
    result = slow["reply"].result(timeout=300)
    assert result.stdout == (SIGHTSEEING_A + "\n").encode("utf-8")
    ok(result)


def test_real_and_warm_runs_agree(env, warm, slow, model, no_weights, tmp_path):
    """One run of each outcome through the real executable gives exactly what the warm runner gives."""
    llama = tmp_path / "llama"
    shutil.copytree(no_weights, llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    cases = [
        (("ask", "--model", no_weights, "--show-prompt", "三行で要約して"), "資料\r\n二行目\n".encode()),
        (("ask", "--model", model, "--top-p", "1.5", "x"), None),
        (("ask", "--model", model, "--max-new-tokens", "5000", "x"), None),
        (("ask", "--model", model, " \n "), None),
        (("ask", "--model", model), b"   \n"),
        (("ask", "--model", model), b"\x82\xa0"),
        (("ask", "--model", model, "要約して"), b"\xe3\x81\x82" * 350000),
        (("ask", "--model", model, "-n", "100", "吾輩は猫である。" * 700), None),
        (("ask", "--model", str(tmp_path / "nowhere"), "x"), None),
        (("ask", "--model", str(llama), "x"), None),
        (("ask", "--model", no_weights, "x"), None),
    ]
    for args, stdin in cases:
        real, forked = rinna(env, *args, stdin=stdin), warm.run(*args, stdin=stdin)
        assert real.returncode in (0, 1, 2) and b"Traceback" not in real.stderr
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    real = slow["reply"].result(timeout=300)
    forked = warm.run(*real.args[len(RINNA):])
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


def test_head_ends_quietly(slow):
    result = slow["head"].result(timeout=300)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception" not in stderr, stderr
    assert stderr == ""
    assert result.stdout == (CAT_A + "\n").encode()[:5]


# --- Ctrl-C ---------------------------------------------------------------------------------------


def test_sigint_stops_generation_keeps_the_output_and_exits_130(slow):
    code, first, rest, stderr = slow["sigint"].result(timeout=300)
    assert first, "SIGINT was sent only after output arrived"
    stdout = first + rest
    assert code == 130, stderr.decode(errors="replace")
    assert "Traceback" not in stderr.decode(errors="replace") and "KeyboardInterrupt" not in stderr.decode()
    assert stdout.startswith(first) and stdout.endswith(b"\n")
    stdout.decode("utf-8")  # whole characters only
    # stopped early: far fewer than 1900 tokens' worth of text (a token is at most a few characters)
    assert len(stdout.decode("utf-8")) < 1000


# --- a terminal ----------------------------------------------------------------------------------


def test_reply_on_a_terminal(slow):
    """`rinna ask --model M -t 0 "好きな食べ物は何ですか?"` in a 24x120 pseudo-terminal (pexpect)."""
    child = slow["pty"]
    output = child.read().decode("utf-8")
    child.close()
    assert child.exitstatus == 0, output
    assert FOOD_A in output.replace("\r\n", "\n")
    assert all(char in output for char in BYTE_FALLBACK_CHARS)
    assert "\ufffd" not in output and "Traceback" not in output


def test_ctrl_c_while_loading_exits_130_quietly(env, model):
    """Ctrl-C as the spinner says it is loading (torch's import): the program ends at once with 130, no reply, no
    error (torch's C start-up once swallowed the interrupt, or failed with "Could not import module …")."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        RINNA[0], [*RINNA[1:], "ask", "--model", model, "-t", "0", "世界で一番高い山は?"],
        env=env, cwd=str(ROOT), dimensions=(24, 120), encoding="utf-8", timeout=60,
    )  # fmt: skip
    child.expect("Loading")
    child.sendintr()
    rest = child.read()
    child.close()
    assert child.exitstatus == 130, rest
    assert "エベレスト" not in rest and "error" not in rest and "Traceback" not in rest, rest
