"""Where a command runs: its streams, whether each is a terminal, and how it gets its model.

The one place that decides terminal vs pipe (as httpie's ``Environment``): the
commands read ``env.stdin_isatty`` and friends instead of probing streams, so
tests run a command in-process with :class:`io.StringIO` streams and a scripted
engine from ``open_engine``.
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, TextIO, cast

from rinna_cli import hub
from rinna_cli.inputs import escaped
from rinna_cli.interrupt import in_a_daemon_thread
from rinna_cli.render import err_console, escape_controls, is_tty, warn as print_warning
from rinna_cli.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rich.console import Console

    from rinna_cli.config import Settings
    from rinna_cli.contract import Engine


class EngineFactory(Protocol):
    def __call__(self, env: Environment, settings: Settings, tokenizer: Tokenizer, window: int) -> Engine: ...


def load_engine(env: Environment, settings: Settings, tokenizer: Tokenizer) -> Engine:
    """Fetch the weights if needed (huggingface_hub's progress bars on stderr), then load them under a spinner.

    The download comes first: Rich's status redirects stderr and would hide the download's bars.
    """
    folder = hub.locate(settings.model, weights=True)
    status = env.errors().status(f"Loading {settings.model} …") if env.stderr_isatty else None
    with status or nullcontext():
        # torch's import (a second or more) on a thread of its own: a Ctrl-C during it reached torch's C code,
        # which swallowed it or failed with a misleading error, where the main thread now just stops waiting
        engine = in_a_daemon_thread(lambda: importlib.import_module("rinna_cli.engine"), "rinna-import")
        return engine.Engine.load(
            folder,
            settings.model,
            tokenizer,
            settings.device,
            settings.dtype,
            settings.quantize,
            progress=lambda step: status.update(f"Loading {settings.model}: {step} …") if status else None,
        )


def open_engine(env: Environment, settings: Settings, tokenizer: Tokenizer, window: int) -> Engine:
    """The local engine, or with ``endpoint`` set a remote one (checked to answer) that takes the same calls."""
    if not settings.endpoint:
        return load_engine(env, settings, tokenizer)
    from rinna_cli.remote import connect

    return connect(settings, tokenizer, window, environ=env.environ, warn=env.warn)


def tokenizer_of(settings: Settings, generating: bool = True) -> tuple[Path, Tokenizer]:
    """The model's folder (its tokenizer files at least) and its tokenizer; ``generating`` here (not on a server, nor
    just tokenizing) for the advice when it is missing."""
    folder = hub.locate(settings.model, generating=generating and not settings.endpoint)
    return folder, Tokenizer.from_folder(folder)


def model_files(settings: Settings, generating: bool = True) -> tuple[Tokenizer, int]:
    """The model's tokenizer and its context window (from ``config.json``); ``generating`` as :func:`tokenizer_of`."""
    folder, tokenizer = tokenizer_of(settings, generating)
    return tokenizer, hub.context_window(hub.read_config(folder))


def _stdin() -> TextIO | None:
    return sys.stdin


class ClosedOutput(io.TextIOBase):
    """Standard output closed (``>&-``): writing to it fails as writing to a closed descriptor does."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def _stdout() -> TextIO:
    return sys.stdout if sys.stdout is not None else cast(TextIO, ClosedOutput())


def _stderr() -> TextIO:
    return sys.stderr


@dataclass
class Environment:
    """The streams of one run and their TTY flags; ``open_engine`` makes the model (patchable in tests)."""

    stdin: TextIO | None = field(default_factory=_stdin)  # None: standard input is closed
    stdout: TextIO = field(default_factory=_stdout)
    stderr: TextIO = field(default_factory=_stderr)
    stdin_isatty: bool | None = None  # None: asked of the stream
    stdout_isatty: bool | None = None
    stderr_isatty: bool | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    open_engine: EngineFactory = open_engine

    def __post_init__(self) -> None:
        if self.stdin_isatty is None:
            self.stdin_isatty = self.stdin is not None and is_tty(self.stdin)
        if self.stdout_isatty is None:
            self.stdout_isatty = is_tty(self.stdout)
        if self.stderr_isatty is None:
            self.stderr_isatty = is_tty(self.stderr)

    def errors(self) -> Console:
        """A Rich console on stderr, for progress, statistics and messages."""
        return err_console(self.stderr)

    def warn(self, message: str) -> None:
        print_warning(escaped(message), self.stderr)

    def error(self, message: str) -> None:
        """The one line every failure becomes: ``rinna: error: …`` (bytes that were not UTF-8 shown escaped)."""
        line = f"rinna: error: {escape_controls(escaped(message))}"
        self.errors().print(line, markup=False, highlight=False, soft_wrap=True)
