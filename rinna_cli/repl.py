"""``rinna chat``: the multi-turn loop, on a terminal or over piped lines.

:class:`Chat` holds the conversation and carries out messages and slash
commands for any :class:`rinna_cli.contract.Engine` (tests pass the scripted
fake); :func:`run_terminal` and :func:`run_piped` feed it lines. The command
around it (session files, resume) is :mod:`rinna_cli.chat`.
"""

from __future__ import annotations

import datetime
import os
import re
import select
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, TextIO

from rich.cells import cell_len

from rinna_cli import commands, config, hub, store
from rinna_cli.config import SAMPLING_KEYS, Settings
from rinna_cli.contract import Engine, Reply, Step, check_fits, placement, stats_line
from rinna_cli.environment import Environment
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.interrupt import sigint_sets
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.render import ReplyView, escape_controls
from rinna_cli.session import Conversation, Turn


class Chat:
    """One conversation with a loaded engine; ``notice`` shows command feedback and warnings,
    ``alert`` the errors (by default a notice starting ``error: ``).

    ``exit_code``: that of the first error (a refused line, a failed reply), 0 if none; a
    piped chat ends with it.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        view: ReplyView,
        notice: Callable[[str], None],
        log: store.SessionLog | None = None,
        alert: Callable[[str], None] | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self.view = view
        self.notice = notice
        self.alert = alert or (lambda text: notice(f"error: {text}"))
        self.log = log
        self.conversation = Conversation(engine.tokenizer)
        self.start = 0  # the first turn still in the prompt (older ones no longer fit the window)
        self.last: Reply | None = None
        self.exit_code = 0

    def error(self, message: str, exit_code: int = 1) -> None:
        """Show an error; the first one sets :attr:`exit_code`."""
        self.exit_code = self.exit_code or exit_code
        self.alert(message)

    # -- messages -------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Carry out one input line; False means the user asked to quit."""
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal sent that are not UTF-8 (surrogate escapes)
            self.error("the input is not valid UTF-8 (is the terminal set to UTF-8?); nothing was sent", 2)
            return True
        parsed = commands.parse(line)
        if isinstance(parsed, commands.Invalid):
            self.error(parsed.hint, 2)
        elif isinstance(parsed, commands.Command):
            if parsed.name == "exit":
                return False
            run = getattr(self, f"_{parsed.name}")
            try:
                run(*parsed.args, force=True) if parsed.force else run(*parsed.args)
            except RinnaError as err:
                self.error(str(err), err.exit_code)
        elif parsed.text.strip():
            self._drop_unanswered()
            self._record(self.conversation.add_user(parsed.text))
            self.reply()
        return True

    def _drop_unanswered(self) -> None:
        """A message left without a reply (its reply failed) is replaced by the next one, never sent twice in a row."""
        turns = self.conversation.turns
        if turns and turns[-1].speaker == USER:
            turns.pop()
            self._forget(1)

    def _record(self, turn: Turn) -> None:
        if self.log:
            self.log.turn(turn, asdict(self.settings.sampling()))

    def _forget(self, count: int) -> None:
        if self.log and count:
            self.log.append({"type": "undo", "count": count})

    def _keep_start_in_reach(self) -> None:
        """After turns were removed, the prompt starts no later than the last user turn (``fit`` moves it on)."""
        users = [i for i, turn in enumerate(self.conversation.turns) if turn.speaker == USER]
        self.start = min(self.start, users[-1] if users else 0)

    def reply(self, new_message: bool = True) -> None:
        """Generate the reply to the conversation as it stands, streaming it.

        ``new_message``: the last turn is a message just typed, withdrawn again
        if it cannot fit the window (a ``/retry`` keeps the turn it answers).
        """
        self._keep_start_in_reach()
        try:
            start = self.conversation.fit(self.engine.window, self.settings.max_new_tokens, self.start)
        except UsageError as err:
            if new_message:
                self.conversation.turns.pop()
                self._forget(1)
                self.error(f"{err}; the message was not sent", err.exit_code)
            else:
                self.error(str(err), err.exit_code)
            return
        if start > self.start:
            self.notice(
                f"context full: the {start} oldest turns are left out of the prompt from now on "
                "(they stay in /history and in saved files)"
            )
            self.start = start
        stop = threading.Event()
        streamed: list[str] = []

        def on_step(step: Step) -> None:
            streamed.append(step.text)
            self.view.write(step.text)

        self.view.label(SYSTEM, waiting=True)
        try:
            with sigint_sets(stop):
                prompt_ids = self.conversation.prompt_ids(self.start)
                reply = self.engine.generate(prompt_ids, self.settings.sampling(), on_step, stop)
        except KeyboardInterrupt:
            # A second Ctrl-C before the model stopped: keep what was shown.
            if streamed:
                self._record(self.conversation.add_reply("".join(streamed), interrupted=True))
            self.view.end("interrupted", gap=True)
            return
        except RinnaError as err:
            # The message stays, unanswered (a partial reply is not kept): /retry sends it again.
            self.view.abandon()
            self.error(
                f"{err}; the message is kept without a reply: /retry sends it again, /undo drops it", err.exit_code
            )
            return
        interrupted = reply.finish_reason == "interrupted"
        # Saved before the reply's last newline is shown: a reply seen complete is on disk.
        self._record(self.conversation.add_reply(reply.text, reply.ids, interrupted=interrupted))
        self.view.end("interrupted" if interrupted else None, gap=True)
        self.last = reply

    def show_last_exchange(self) -> None:
        """The last message and its reply, as they were shown (a resumed chat on a terminal)."""
        turns = self.conversation.turns
        users = [i for i, turn in enumerate(turns) if turn.speaker == USER]
        for turn in turns[users[-1] :] if users else turns[-1:]:
            self.view.label(turn.speaker, style="bold green" if turn.speaker == USER else "bold cyan")
            self.view.write(turn.text)
            self.view.end("interrupted" if turn.interrupted else None, gap=turn.speaker == SYSTEM)

    # -- slash commands -------------------------------------------------------------------------

    def _help(self) -> None:
        self.notice(commands.help_text())

    def _reset(self) -> None:
        self.conversation.turns.clear()
        self.start = 0
        if self.log:
            self.log.append({"type": "reset"})
        self.notice("new conversation")

    def _undo(self) -> None:
        count = self.conversation.undo()
        self._forget(count)
        self._keep_start_in_reach()
        self.notice("removed the last exchange" if count else "nothing to undo")

    def _retry(self) -> None:
        turns = self.conversation.turns
        if turns and turns[-1].speaker == SYSTEM:
            turns.pop()
            self._forget(1)
        if not turns:
            self.notice("nothing to retry")
            return
        self.reply(new_message=False)

    def _history(self) -> None:
        turns = self.conversation.turns
        if not turns:
            self.notice("the conversation is empty")
        for index, turn in enumerate(turns):
            mark = " [interrupted]" if turn.interrupted else ""
            left_out = " (left out of the prompt)" if index < self.start else ""
            label = f"{turn.speaker}: "
            text = escape_controls(turn.text).replace("\n", "\n" + " " * cell_len(label))
            self.notice(f"{label}{text}{mark}{left_out}")

    def _save(self, path: str = "", force: bool = False) -> None:
        """Save to PATH, never over an existing file unless forced (``/save!``); no PATH: a new file in the app dir."""
        turns, settings = self.conversation.turns, asdict(self.settings.sampling())
        if path:
            try:
                saved = store.save_transcript(Path(path), turns, self.engine.name, settings, replace=force)
            except FileExistsError:
                raise UsageError(f"{Path(path).expanduser()} already exists; /save! {path} replaces it") from None
        else:
            saved = _save_new(turns, self.engine.name, settings)
        self.notice(f"saved {len(turns)} turns to {saved}")

    def _load(self, path: str) -> None:
        loaded = store.load_transcript(Path(path))
        self.replace(loaded)
        self.notice(f"loaded {len(loaded.turns)} turns from {path}")
        self.adopt(loaded.settings)

    def adopt(self, stored: dict, keep: Collection[str] = ()) -> None:
        """Take the sampling settings a transcript or log stored, but those in ``keep`` (given as flags).

        A stored value that is not valid here (edited by hand, another window) is skipped with a notice.
        """
        settings, changed = self.settings, []
        for key in SAMPLING_KEYS:
            if key in keep or key not in stored or stored[key] == getattr(settings, key):
                continue
            try:
                candidate = settings.with_value(key, stored[key], "stored settings")
                check_fits(0, candidate.max_new_tokens, self.engine.window)
            except UsageError as err:
                self.notice(f"{err}; kept {key} = {getattr(settings, key)}")
                continue
            settings = candidate
            changed.append(f"{key}={getattr(settings, key)}")
        self.settings = settings
        if changed:
            self.notice(f"settings restored: {', '.join(changed)}")

    def replace(self, loaded: store.Loaded) -> None:
        """Continue ``loaded`` instead of the current conversation (saved ids kept for the same model)."""
        conversation = Conversation(self.engine.tokenizer)
        same_model = loaded.model is not None and hub.canonical(loaded.model) == hub.canonical(self.engine.name)
        for saved in loaded.turns:
            conversation.restore(saved, keep_ids=same_model)
        self.conversation, self.start = conversation, 0
        if self.log:
            self.log.append({"type": "reset"})
            for turn in conversation.turns:
                self._record(turn)

    def _set(self, key: str, value: str) -> None:
        try:
            if key not in SAMPLING_KEYS:
                raise UsageError(f"/set: unknown setting {key!r}; known: {', '.join(SAMPLING_KEYS)}")
            settings = self.settings.with_value(key, value, "/set")
            try:
                check_fits(0, settings.max_new_tokens, self.engine.window)
            except UsageError as err:
                raise UsageError(f"/set: {err}") from None
        except UsageError as err:
            self.error(str(err), err.exit_code)
            return
        self.settings = settings
        self.notice(f"{key} = {getattr(settings, key)}")

    def _show(self) -> None:
        used = len(self.conversation.prompt_ids(self.start))
        options = ", ".join(f"{k}={v}" for k, v in asdict(self.settings.sampling()).items())
        self.notice(f"model: {self.engine.name}\ndevice: {placement(self.engine)}\nsettings: {options}")
        self.notice(
            f"context used: {used} / {self.engine.window} tokens (+ up to {self.settings.max_new_tokens} for the reply)"
        )

    def _stats(self) -> None:
        reply = self.last
        if reply is None:
            self.notice("no reply yet")
            return
        self.notice(stats_line(reply))


def _save_new(turns: list[Turn], model: str, settings: dict) -> Path:
    """A new transcript file in ``<app dir>/transcripts``, never over another one."""
    folder = config.app_dir() / "transcripts"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise RinnaError(f"{folder}: cannot save ({err.strerror or err})") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        try:
            return store.save_transcript(
                folder / f"chat-{stamp}{f'-{n}' if n else ''}.json", turns, model, settings, replace=False
            )
        except FileExistsError:
            continue
    raise RinnaError(f"{folder}: no free transcript name")


def run_piped(chat: Chat, lines: Iterable[bytes]) -> int:
    """Each non-empty line of standard input is one user turn (or a slash command).

    A refused line is an error and the lines after it still run; the status is that of the first error.
    """
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UsageError(
                f"standard input line {number} is not UTF-8; convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`"
            )
        if line.strip() and not chat.handle(line):
            break
    return chat.exit_code


def _history(path: Path, warn: Callable[[str], None]):
    """prompt_toolkit's file history, each entry appended with one ``write``; a failing disk warns once."""
    from prompt_toolkit.history import FileHistory

    class History(FileHistory):
        failed = False

        def store_string(self, string: str) -> None:
            entry = f"\n# {datetime.datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
            try:
                fd = os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, entry.encode("utf-8", errors="replace"))
                finally:
                    os.close(fd)
            except OSError as err:
                if not self.failed:
                    self.failed = True
                    warn(f"cannot write the input history {os.fsdecode(self.filename)} ({err.strerror or err})")

    return History(str(path))


# What typed-ahead keys may bring besides text: escape sequences (arrows, function keys) and controls.
_KEY_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|O.|.)?")


def _typed_text(data: bytes) -> str:
    """The text that typed-ahead bytes spell: Backspace applied, Enter a newline, other keys dropped."""
    text: list[str] = []
    for char in _KEY_ESCAPE.sub("", data.decode("utf-8", "ignore")).replace("\r", "\n"):
        if char in "\x7f\b":
            if text:
                text.pop()
        elif char == "\n" or escape_controls(char) == char:
            text.append(char)
    return "".join(text).strip("\n")


@contextmanager
def _keys_held(stdin: TextIO | None) -> Iterator[list[str]]:
    """While a reply streams the terminal neither echoes keys nor waits for Enter (Ctrl-C still
    signals); what was typed meanwhile is read back at the end into the yielded list."""
    typed: list[str] = []
    try:
        import termios

        fd = stdin.fileno() if stdin is not None else -1
        saved = termios.tcgetattr(fd)
    except Exception:  # no terminal here: tests, a closed stdin, Windows (no termios)
        yield typed
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[3] |= termios.NOFLSH  # Ctrl-C keeps what was typed before it
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield typed
    finally:
        data = b""
        try:
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        termios.tcsetattr(fd, termios.TCSANOW, saved)
        typed.append(_typed_text(data))


QUIT_HINT = "(Ctrl-D or /exit to quit)"


def run_terminal(chat: Chat, history_file: Path | None, env: Environment) -> int:
    """The interactive prompt: Enter sends, Alt+Enter adds a line, Tab completes a command, Ctrl-C clears, Ctrl-D quits."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import create_output

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    history = _history(history_file, env.warn) if history_file else InMemoryHistory()
    # With stdout redirected (`rinna chat > chat.txt`) the prompt is drawn on the terminal's
    # stderr; by default prompt_toolkit would draw it, escapes and all, into the file.
    output = create_output(always_prefer_tty=True) if not env.stdout_isatty and env.stderr_isatty else None
    session: PromptSession[str] = PromptSession(
        history=history,
        key_bindings=bindings,
        enable_open_in_editor=False,
        output=output,
        completer=WordCompleter(commands.names(), sentence=True),
        complete_while_typing=False,
    )
    label = f"{USER}: "
    typed = ""
    while True:
        try:
            line = session.prompt(
                [("bold fg:ansigreen", label)], prompt_continuation=" " * cell_len(label), default=typed
            )
        except KeyboardInterrupt:
            typed = ""
            if not session.default_buffer.text:
                chat.notice(QUIT_HINT)
            continue
        except EOFError:
            return 0
        try:
            with _keys_held(env.stdin) as held:
                if not chat.handle(line):
                    return 0
        except KeyboardInterrupt:
            # Ctrl-C outside generation (while the prompt was being built or saved): back to the prompt.
            chat.notice("interrupted")
        typed = held[-1] if held else ""
