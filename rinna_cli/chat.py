"""``rinna chat``: opens the session (resumed or loaded), the engine and the log, then runs the loop of :mod:`.repl`."""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Collection, Iterator

from rich.cells import cell_len

from rinna_cli import config, hub, store
from rinna_cli.contract import check_fits, placement
from rinna_cli.environment import Environment, model_files
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.render import ReplyView, escape_controls
from rinna_cli.repl import Chat, run_piped
from rinna_cli.terminal import run_terminal, show_last_exchange


def _writable(path: Path) -> bool:
    """Whether ``path`` can be appended to (created, private to the user, if missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        return True
    except OSError:
        return False


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM ends the chat like Ctrl-D would: the terminal is restored on the way out
    (every completed turn is already in the session file)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _notice(env: Environment, view: ReplyView) -> Callable[[str], None]:
    """Command feedback: dimmed in the conversation on a terminal, else plain lines on stderr."""
    if env.stdin_isatty and view.console is not None:
        console = view.console
        return lambda text: console.print(text, markup=False, style="dim", highlight=False, soft_wrap=True)
    errors = env.errors()
    return lambda text: errors.print(text, markup=False, highlight=False, soft_wrap=True)


def _alert(env: Environment, view: ReplyView) -> Callable[[str], None]:
    """Errors: red in the conversation on a terminal, else the one error line (``rinna: error: …``) on stderr."""
    if env.stdin_isatty and view.console is not None:
        console = view.console
        return lambda text: console.print(
            f"error: {escape_controls(text)}", markup=False, style="red", highlight=False, soft_wrap=True
        )
    return env.error


def sessions_folder() -> Path:
    return config.app_dir() / "sessions"


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, "…" marking a cut."""
    if cell_len(text) <= width:
        return text
    kept = ""
    for char in text:
        if cell_len(kept + char) > width - 1:
            break
        kept += char
    return kept + "…"


def list_sessions(env: Environment, limit: int = 20) -> int:
    """``rinna sessions``: the recent chats, newest first, numbered as ``--resume N`` takes them."""
    if limit < 1:
        raise UsageError(f"--limit {limit} is out of range; allowed: limit >= 1")
    folder = sessions_folder()
    listed = store.sessions(folder)
    if not listed:
        env.errors().print(f"no saved chat sessions in {folder}", markup=False, highlight=False, soft_wrap=True)
        return 0
    for number, info in enumerate(listed[:limit], 1):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified))
        first = escape_controls(info.first.split("\n", 1)[0])
        first = _clip(first, 40)
        piped = "  (piped)" if not info.interactive else ""
        turns = f"{info.turns:>3} {'turn ' if info.turns == 1 else 'turns'}"
        env.stdout.write(f"{number:>3}  {info.id}  {when}  {turns}  {first}{piped}\n")
    if len(listed) > limit:
        env.errors().print(f"… and {len(listed) - limit} older, in {folder}", markup=False, highlight=False)
    return 0


def resume_target(resume: bool, session: str | None) -> str | None:
    """What ``rinna chat [--resume] [N|ID]`` asks to continue: None (a new chat), "" (the last one), N or an id."""
    if session is not None and not resume:
        if session[:1].isdigit() and set(session) <= set("0123456789-"):  # a number or (the start of) a session's id
            raise UsageError(f"to continue session {session!r}, add --resume: rinna chat --resume {session}")
        raise UsageError(
            "rinna chat takes no message: type it at its prompt, pipe it in (echo 質問 | rinna chat), "
            f"or ask once: rinna ask {shlex.quote(session)}"
        )
    return (session or "") if resume else None


def chat(
    env: Environment,
    settings: config.Settings,
    resume: bool | str | None,
    load: Path | None,
    given: Collection[str] | None = None,
) -> int:
    """Run a chat; returns the exit code.

    ``resume``: True or "" continues the last interactive session, ``"N"`` the N-th of
    ``rinna sessions``, any other string a session id (or its start); False/None starts afresh.
    ``given``: the settings set by flags, which win over those a resumed or loaded file stored
    (None: not known, so the stored settings are not restored and the flags stay in force).
    """
    which = "" if resume is True else resume if isinstance(resume, str) else None
    if which is not None and load:
        raise UsageError("--resume and --load cannot be used together")
    sessions = sessions_folder()
    resumed = store.find_session(sessions, which).path if which is not None else None
    loaded = store.replay_log(resumed) if resumed else store.load_transcript(load) if load else None
    # the conversation's own model, unless --model names another (a ppo chat goes on with ppo)
    stored, restore_model = loaded.model if loaded is not None else None, False
    if stored and given is not None and "model" not in given and hub.canonical(stored) != hub.canonical(settings.model):
        settings, restore_model = replace(settings, model=stored), True
    try:
        tokenizer, window = model_files(settings)
    except RinnaError as err:
        if not restore_model:
            raise
        raise type(err)(f"{err} (the model of {resumed or load}; --model continues it with another)") from None
    check_fits(0, settings.max_new_tokens, window)
    engine = env.open_engine(env, settings, tokenizer, window)
    # A resumed or loaded conversation continues in a new session file of its own (its turns
    # copied first), so two chats never append to the same file. A piped run is marked, so
    # that `--resume` alone continues the last conversation a person had.
    header: dict = {"model": settings.model, "created": time.time(), "interactive": bool(env.stdin_isatty)}
    if resumed or load:
        header["continues"] = str(resumed or load)
    log = store.SessionLog.create(sessions, env.warn, header)
    view = ReplyView(env.stdout, env.stdout_isatty)
    notice = _notice(env, view)
    session = Chat(engine, settings, view, notice, log=log, alert=_alert(env, view))
    if env.stdin_isatty:
        notice(
            f"{settings.model} on {placement(engine)} · Alt+Enter for a new line · /help for commands · Ctrl-D to quit"
        )
    copied = -1  # the log's records once a resumed or loaded conversation is copied into it
    if loaded:
        if restore_model:
            notice(f"model restored: {settings.model}")
        session.replace(loaded)
        copied = log.records
        notice(f"continuing {len(loaded.turns)} turn{'' if len(loaded.turns) == 1 else 's'} from {resumed or load}")
        if given is not None:
            session.adopt(loaded.settings, keep=given)
        if env.stdin_isatty and view.console is not None:  # never into a redirected stdout
            show_last_exchange(session)
    try:
        with _sigterm_exits():
            if not env.stdin_isatty:
                return run_piped(session, env.stdin.buffer if env.stdin is not None else [])
            history_file = config.app_dir() / "history"
            history = history_file if _writable(history_file) else None
            if history is None:
                env.warn(f"cannot write the input history {history_file}; it is kept in memory only")
            return run_terminal(session, history, env)
    finally:
        if log.records == copied:  # nothing said, undone or reset since: the original stays the one to resume
            log.discard()
