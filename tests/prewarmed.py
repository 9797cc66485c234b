"""Real ``rinna`` processes without paying torch's import in each: forked from a server that imported it.

A model-loading ``rinna`` spends most of its start importing torch (about 2.5 s of 4.5 s here).
:func:`popen` and :func:`run` are :class:`subprocess.Popen` and :func:`subprocess.run` whose
child is forked from a server process that has imported torch and nothing that reads the
environment at import (transformers, huggingface_hub and rinna_cli are imported by the child,
under its own environment). The child is a real process: its own pid, the caller's pipes as
its fds 0-2 (passed over a Unix socket), real signals and exit status. The server forks twice
and this process is a child subreaper, so the child becomes this process's own child and
``wait`` works as usual.

There is one server per value of what a process reads at start (Python's and OpenMP's
variables). :func:`spawn` does the same for pexpect, on a new pty that becomes the child's
controlling terminal. Not for runs whose point is the executable's start (what it imports):
those exec ``rinna`` as usual.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# What a process reads as it starts (Python, OpenMP, torch): a server serves one value of these.
_STARTUP_PREFIXES = ("PYTHON", "OMP_", "KMP_", "MKL_", "GOMP_", "TORCH_", "PYTORCH_", "LC_", "LANG")
_PR_SET_CHILD_SUBREAPER = 36

_SERVER = r"""
import io, json, os, runpy, signal, socket, sys, traceback
import numpy, torch, torch.distributed.tensor, torch._dynamo, safetensors.torch, sentencepiece  # noqa: F401

def child(job, fds):
    if job["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    if job["terminal"]:  # the pty becomes the controlling terminal, as pty.fork makes it
        import fcntl, termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    for name, fd, mode in (("stdin", 0, "rb"), ("stdout", 1, "wb"), ("stderr", 2, "wb")):  # as Python makes them
        old = getattr(sys, name)
        unbuffered = fd > 0 and old.write_through  # PYTHONUNBUFFERED
        binary = io.open(fd, mode, buffering=0 if unbuffered else -1, closefd=False)
        stream = io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors, write_through=unbuffered,
                                  line_buffering=fd == 2 or (fd == 1 and os.isatty(1)))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    kind, target, argv = job["kind"], job["target"], job["argv"]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(target)) if kind == "script" else os.getcwd()
    code = 0
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "script":
            runpy.run_path(target, run_name="__main__")
        else:
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as Python does: die of SIGINT
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 120
    os._exit(code)

server = socket.socket(fileno=int(sys.argv[1]))
while True:
    message, fds, _, _ = socket.recv_fds(server, 1 << 20, 3)
    if not message:
        break
    job = json.loads(message)
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:  # forks the child and exits at once, so the child is reparented to the subreaper
        server.close()
        os.close(read)
        pid = os.fork()
        if pid == 0:
            os.close(write)
            try:
                child(job, fds)
            finally:
                os._exit(70)
        os.write(write, str(pid).encode())
        os._exit(0)
    os.close(write)
    pid = int(os.read(read, 64))
    os.close(read)
    os.waitpid(middle, 0)
    for fd in fds:
        os.close(fd)
    server.send(json.dumps({"pid": pid}).encode())
"""


class _Server:
    """One forking server (started on first use) for one value of the startup variables; it ends when this
    process does (its socket closes)."""

    def __init__(self, env: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.socket = ours
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()

    def fork(self, job: dict, fds: list[int]) -> int:
        socket.send_fds(self.socket, [json.dumps(job).encode()], fds)
        answer = self.socket.recv(1 << 16)
        if not answer:
            raise RuntimeError("the prewarmed server died")
        return json.loads(answer)["pid"]


_servers: dict[tuple, _Server] = {}


@functools.cache
def _is_subreaper() -> bool:
    """Make this process the subreaper of its descendants (once); False where the platform cannot."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _fork(argv: list, env: dict | None, cwd, fds: list[int], new_session: bool, terminal: bool = False) -> int:
    """Have the server for ``env``'s startup variables run ``argv`` with ``fds`` as its 0-2; the child's pid."""
    environ = dict(os.environ if env is None else env)
    argv = [a.decode() if isinstance(a, bytes) else a for a in argv]
    job = {
        **_job(argv),
        "env": environ,
        "cwd": str(cwd or os.getcwd()),
        "new_session": new_session,
        "terminal": terminal,
    }
    key = tuple(sorted((k, v) for k, v in environ.items() if k.startswith(_STARTUP_PREFIXES)))
    if key not in _servers:
        _servers[key] = _Server({k: v for k, v in environ.items() if k.startswith(_STARTUP_PREFIXES) or k == "PATH"})
    return _servers[key].fork(job, fds)


def _job(args: list[str]) -> dict:
    """What the server runs for ``args``: a Python script (the ``rinna`` executable), ``-m MODULE`` or ``-c CODE``."""
    if args[0] == sys.executable and args[1] in ("-m", "-c"):
        kind = "module" if args[1] == "-m" else "code"
        return {"kind": kind, "target": args[2], "argv": [args[2] if kind == "module" else "-c", *args[3:]]}
    if args[0] == sys.executable:
        return {"kind": "script", "target": args[1], "argv": args[1:]}
    first = Path(args[0]).read_bytes()[:200]
    if not first.startswith(b"#!") or b"python" not in first.splitlines()[0]:
        raise ValueError(f"not a Python program: {args[0]}")
    return {"kind": "script", "target": args[0], "argv": list(args)}


class _Forked(subprocess.Popen):
    """:class:`subprocess.Popen` whose child comes from a prewarmed server instead of fork and exec."""

    def __init__(self, args, **kwargs):
        self._new_session = bool(kwargs.get("start_new_session"))
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *_):  # fmt: skip
        try:
            fds = [
                p2cread if p2cread != -1 else 0,
                c2pwrite if c2pwrite != -1 else 1,
                errwrite if errwrite != -1 else 2,
            ]
            self.pid = _fork(list(args), env, cwd, fds, self._new_session)
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


def popen(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``, forked from a prewarmed server where this platform allows it."""
    return _Forked(args, **kwargs) if _is_subreaper() else subprocess.Popen(args, **kwargs)


def spawn(command: str, args: list[str], *, dimensions: tuple[int, int] = (24, 80), **kwargs):
    """``pexpect.spawn(command, args, ...)`` whose child, on a new pty, is forked from a prewarmed server."""
    import fcntl
    import struct
    import termios

    import pexpect
    import ptyprocess

    class Spawned(pexpect.spawn):
        def _spawnpty(self, argv, env=None, cwd=None, **_):
            master, terminal = os.openpty()
            fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", *dimensions, 0, 0))
            try:
                pid = _fork(argv, env, cwd, [terminal] * 3, new_session=True, terminal=True)
            finally:
                os.close(terminal)
            return ptyprocess.PtyProcess(pid, master)

    kind = Spawned if _is_subreaper() else pexpect.spawn
    return kind(command, args, dimensions=dimensions, **kwargs)


def run(args: list[str], *, input: bytes | None = None, timeout: float | None = None, **kwargs):
    """``subprocess.run(args, capture_output=True, ...)`` with the child from :func:`popen`."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            process.kill()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
