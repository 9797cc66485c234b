"""The prewarmed processes of the tests are real processes that behave as exec'd ones."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests import prewarmed
from tests.fixtures.memorized_data import CONVERSATIONS
from tests.helpers import RINNA, ROOT, process_env

CHILD = """
import os, sys
print(os.environ["X"], os.getcwd(), sys.argv[1:], sys.stdin.read(), "torch" in sys.modules, flush=True)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_arguments_environment_folder_streams_and_exit_code(tmp_path):
    env = process_env(tmp_path / "hf", tmp_path / "home", X="値")
    args = [sys.executable, "-c", CHILD, "3", "引数"]
    forked = prewarmed.run(args, input="入力".encode(), env=env, cwd=tmp_path)
    assert (forked.returncode, forked.stderr) == (3, b"to stderr\n")
    assert forked.stdout.decode() == f"値 {tmp_path} ['3', '引数'] 入力 True\n"  # torch: the server imported it
    real = subprocess.run(args, input="入力".encode(), env=env, cwd=tmp_path, capture_output=True)
    assert real.stdout.replace(b" False\n", b" True\n") == forked.stdout and real.stderr == forked.stderr


def test_signals_reach_the_child_and_its_status_is_waited_for_here(tmp_path):
    env = process_env(tmp_path / "hf", tmp_path / "home")
    code = "import sys, time; print('ready', flush=True); time.sleep(60)"
    for how, status in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, -signal.SIGINT)):
        process = prewarmed.popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        assert process.stdout.readline() == b"ready\n"
        process.send_signal(how)  # SIGINT: KeyboardInterrupt, then death by SIGINT, as Python does
        assert process.wait(30) == status
        process.stdout.close()


def test_rinna_gives_the_bytes_of_the_executable(memorized_model, tmp_path):
    question, answer = CONVERSATIONS[3][0]
    env = process_env(tmp_path / "hf", tmp_path / "home", OMP_NUM_THREADS="1", RINNA_QUANTIZE="none")
    args = [*RINNA, "ask", "--model", str(memorized_model), "-t", "0", "--stats", question]
    forked = prewarmed.run(args, stdin=subprocess.DEVNULL, env=env, cwd=ROOT, timeout=120)
    real = subprocess.run(args, stdin=subprocess.DEVNULL, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert forked.returncode == real.returncode == 0, forked.stderr.decode()
    assert forked.stdout == real.stdout == f"{answer}\n".encode()
    counts = [result.stderr.decode().splitlines()[-1].split(", first token")[0] for result in (forked, real)]
    assert counts[0] == counts[1] and counts[0].endswith("prefilled)")  # the --stats line up to its timings


def test_a_pty_child_has_it_as_its_controlling_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    code = "import os, shutil, time; print(os.isatty(0), os.getsid(0) == os.getpid(), shutil.get_terminal_size()); time.sleep(60)"
    child = prewarmed.spawn(sys.executable, ["-c", code], env=process_env(tmp_path / "hf", tmp_path / "home"),
                            dimensions=(30, 100), encoding="utf-8", timeout=60)  # fmt: skip
    child.expect(r"True True os\.terminal_size\(columns=100, lines=30\)")
    child.sendintr()  # ^C on the terminal: SIGINT to its foreground group
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus == signal.SIGINT
