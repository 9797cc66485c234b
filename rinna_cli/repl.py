"""``rinna chat``: the multi-turn loop, on a terminal or over piped lines.

:class:`Chat` holds the conversation and carries out messages and slash
commands for any engine with ``generate``/``tokenizer``/``window`` (tests pass
a scripted fake); :func:`run_terminal` and :func:`run_piped` feed it lines.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from rinna_cli import commands, hub, store
from rinna_cli.config import GENERATION_KEYS, Settings
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.interrupt import sigint_sets
from rinna_cli.prompt import SYSTEM, USER
from rinna_cli.render import ReplyView, escape_controls, is_tty
from rinna_cli.session import Conversation, Reply


class Chat:
    """One conversation with a loaded engine; ``notice`` shows command feedback and warnings."""

    def __init__(
        self,
        engine,
        settings: Settings,
        view: ReplyView,
        notice: Callable[[str], None],
        log: store.SessionLog | None = None,
        conversation: Conversation | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self.view = view
        self.notice = notice
        self.log = log
        self.conversation = conversation or Conversation(engine.tokenizer)
        self.start = 0  # the first turn still in the prompt (older ones no longer fit the window)
        self.last: Reply | None = None

    # -- messages -------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Carry out one input line; False means the user asked to quit."""
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal sent that are not UTF-8 (surrogate escapes)
            self.notice("error: the input is not valid UTF-8 (is the terminal set to UTF-8?); nothing was sent")
            return True
        parsed = commands.parse(line)
        if isinstance(parsed, commands.Invalid):
            self.notice(parsed.hint)
        elif isinstance(parsed, commands.Command):
            if parsed.name == "exit":
                return False
            try:
                getattr(self, f"_{parsed.name}")(*parsed.args)
            except RinnaError as err:
                self.notice(f"error: {err}")
        elif parsed.text.strip():
            self._record(self.conversation.add_user(parsed.text))
            self.reply()
        return True

    def _record(self, turn) -> None:
        if self.log:
            self.log.turn(turn, turn.ids, self.settings.generation())

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
        room = self.engine.window - self.settings.max_new_tokens
        try:
            start = self.conversation.fit(room, self.start)
        except UsageError as err:
            if new_message:
                self.conversation.turns.pop()
                self._forget(1)
                self.notice(f"error: {err}; the message was not sent")
            else:
                self.notice(f"error: {err}")
            return
        if start > self.start:
            self.notice(
                f"context full: the {start} oldest turns are left out of the prompt from now on "
                "(they stay in /history and in saved files)"
            )
            self.start = start
        stop = threading.Event()
        streamed: list[str] = []

        def on_text(chunk: str) -> None:
            streamed.append(chunk)
            self.view.write(chunk)

        self.view.label(SYSTEM)
        try:
            with sigint_sets(stop):
                prompt_ids = self.conversation.prompt_ids(self.start)
                reply = self.engine.generate(prompt_ids, self.settings.generation(), on_text, stop)
        except KeyboardInterrupt:
            # A second Ctrl-C before the model stopped: keep what was shown.
            if streamed:
                self._record(self.conversation.add_reply("".join(streamed), interrupted=True))
            self.view.end("interrupted")
            return
        except RinnaError as err:
            self.view.end()
            self.notice(f"error: {err}")
            return
        interrupted = reply.finish_reason == "interrupted"
        # Saved before the reply's last newline is shown: a reply seen complete is on disk.
        self._record(self.conversation.add_reply(reply.text, reply.ids, interrupted=interrupted))
        self.view.end("interrupted" if interrupted else None)
        self.last = reply

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
            self.notice(f"{turn.speaker}: {escape_controls(turn.text)}{mark}{left_out}")

    def _save(self, path: str = "") -> None:
        target = Path(path or f"rinna-chat-{time.strftime('%Y%m%d-%H%M%S')}.json")
        saved = store.save_transcript(target, self.conversation.turns, self.engine.name, self.settings.generation())
        self.notice(f"saved {len(self.conversation.turns)} turns to {saved}")

    def _load(self, path: str) -> None:
        loaded = store.load_transcript(Path(path))
        self.replace(loaded)
        self.notice(f"loaded {len(loaded.turns)} turns from {path}")

    def replace(self, loaded: store.Loaded) -> None:
        """Continue ``loaded`` instead of the current conversation (saved ids kept for the same model)."""
        conversation = Conversation(self.engine.tokenizer)
        same_model = loaded.model is not None and hub.canonical(loaded.model) == hub.canonical(self.engine.name)
        for index, (speaker, text, ids, interrupted) in enumerate(loaded.turns):
            turn = conversation.restore(speaker, text, ids if same_model else None, interrupted)
            if index < len(loaded.times) and loaded.times[index] is not None:
                turn.time = loaded.times[index]
        self.conversation, self.start = conversation, 0
        if self.log:
            self.log.append({"type": "reset"})
            for turn in conversation.turns:
                self._record(turn)

    def _set(self, key: str, value: str) -> None:
        try:
            if key not in GENERATION_KEYS:
                raise UsageError(f"/set: unknown setting {key!r}; known: {', '.join(GENERATION_KEYS)}")
            settings = self.settings.with_value(key, value, "/set")
            if settings.max_new_tokens >= self.engine.window:
                raise UsageError(
                    f"/set: max_new_tokens = {value} is out of range; allowed: 1 <= max_new_tokens < {self.engine.window}"
                )
        except UsageError as err:
            self.notice(f"error: {err}")
            return
        self.settings = settings
        self.notice(f"{key} = {getattr(settings, key)}")

    def _show(self) -> None:
        used = len(self.conversation.prompt_ids(self.start))
        options = ", ".join(f"{k}={v}" for k, v in self.settings.generation().items())
        self.notice(f"model: {self.engine.name}\ndevice: {self.engine.device} ({self.engine.dtype})\nsettings: {options}")
        self.notice(f"context used: {used} / {self.engine.window} tokens (+ up to {self.settings.max_new_tokens} for the reply)")

    def _stats(self) -> None:
        reply = self.last
        if reply is None:
            self.notice("no reply yet")
            return
        self.notice(
            f"{reply.completion_tokens} tokens, prompt {reply.prompt_tokens} ({reply.prefilled_tokens} prefilled), "
            f"first token {reply.ttft_s:.2f} s, {reply.tokens_per_s:.1f} tokens/s"
        )


def run_piped(chat: Chat, lines: Iterable[bytes]) -> int:
    """Each non-empty line of standard input is one user turn (or a slash command)."""
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UsageError(f"standard input line {number} is not UTF-8; convert it first, e.g. `iconv -f SHIFT_JIS -t UTF-8`")
        if line.strip() and not chat.handle(line):
            break
    return 0


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
                    warn(f"cannot write the input history {self.filename} ({err.strerror or err})")

    return History(str(path))


def run_terminal(chat: Chat, history_file: Path | None, warn: Callable[[str], None] | None = None) -> int:
    """The interactive prompt: Enter sends, Alt+Enter adds a line, Ctrl-C clears, Ctrl-D quits."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import create_output

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    history = _history(history_file, warn or chat.notice) if history_file else InMemoryHistory()
    # With stdout redirected (`rinna chat > chat.txt`) the prompt is drawn on the terminal's
    # stderr; by default prompt_toolkit would draw it, escapes and all, into the file.
    output = create_output(always_prefer_tty=True) if not is_tty(sys.stdout) and is_tty(sys.stderr) else None
    session = PromptSession(history=history, key_bindings=bindings, enable_open_in_editor=False, output=output)
    while True:
        try:
            line = session.prompt([("bold fg:ansigreen", f"{USER}: ")], prompt_continuation="  ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        try:
            if not chat.handle(line):
                return 0
        except KeyboardInterrupt:
            # Ctrl-C outside generation (while the prompt was being built or saved): back to the prompt.
            chat.notice("interrupted")
