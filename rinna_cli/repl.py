"""``rinna chat``: the multi-turn loop, on a terminal or over piped lines.

:class:`Chat` holds the conversation and carries out messages and slash
commands for any :class:`rinna_cli.contract.Engine` (tests pass the scripted
fake); :func:`run_terminal` and :func:`run_piped` feed it lines. The command
around it (session files, resume) is :mod:`rinna_cli.chat`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Collection, Iterable

from rich.cells import cell_len

from rinna_cli import commands, config, hub, store
from rinna_cli.config import SAMPLING_KEYS, Settings
from rinna_cli.contract import Engine, Reply, Step, check_fits, placement, stats_line
from rinna_cli.errors import RinnaError, UsageError
from rinna_cli.inputs import decode
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

    def _keep_start_in_reach(self) -> None:
        """After turns were removed, the prompt starts no later than the last user turn (the next reply fits anew)."""
        users = [i for i, turn in enumerate(self.conversation.turns) if turn.speaker == USER]
        self.start = min(self.start, users[-1] if users else 0)

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
        parsed = commands.parse(line.strip())  # as ask trims its question: "  質問" is asked as "質問", " /undo" runs
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

    def reply(self, new_message: bool = True) -> None:
        """Generate the reply to the conversation as it stands, streaming it.

        ``new_message``: the last turn is a message just typed, withdrawn again
        if it cannot fit the window (a ``/retry`` keeps the turn it answers).
        """
        reserved = self.settings.max_new_tokens
        try:  # from the first turn each time: turns left out come back when they fit again (a smaller -n, /undo)
            start = self.conversation.fit(self.engine.window, reserved, 0)
        except UsageError as err:
            if new_message:
                self.conversation.turns.pop()
                self._forget(1)
                self.error(f"{err}; the message was not sent", err.exit_code)
            else:
                self.error(str(err), err.exit_code)
            return
        if start and not self.start:  # told once: in a long chat every exchange leaves out another
            self.notice(
                f"context full: the {start} oldest turns are left out of the prompt, which leaves {reserved} tokens "
                "for the reply (max_new_tokens); more as the chat goes on (they stay in /history and in saved files)"
            )
        elif start < self.start:
            self.notice(f"{self.start - start} turns left out before are back in the prompt")
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
        if interrupted and not reply.ids and not reply.text:  # stopped before its first token: no empty answer kept
            self.view.end("interrupted", gap=True)
            self.notice("stopped before the first token: the message is kept without a reply: /retry sends it again")
            return
        # Saved before the reply's last newline is shown: a reply seen complete is on disk.
        self._record(self.conversation.add_reply(reply.text, reply.ids, interrupted=interrupted))
        self.view.end("interrupted" if interrupted else None, gap=True)
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
        if not self.conversation.turns:
            self.notice("the conversation is empty")
        for line in _history_lines(self.conversation.turns, self.start):
            self.notice(line)

    def _save(self, path: str = "", force: bool = False) -> None:
        """Save to PATH, never over an existing file unless forced (``/save!``); no PATH: a new file in the app dir."""
        turns = self.conversation.turns
        saved = _save_to(path, force, turns, self.engine.name, asdict(self.settings.sampling()))
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
        self.settings, changed = _restored(self.settings, stored, keep, self.engine.window, self.notice)
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
            settings = _with_setting(self.settings, key, value, self.engine.window)
        except UsageError as err:
            self.error(str(err), err.exit_code)
            return
        self.settings = settings
        self.notice(f"{key} = {getattr(settings, key)}")

    def _show(self) -> None:
        self.notice(_show_text(self.engine, self.settings, len(self.conversation.prompt_ids(self.start))))

    def _stats(self) -> None:
        reply = self.last
        if reply is None:
            self.notice("no reply yet")
            return
        self.notice(stats_line(reply))


def _show_text(engine: Engine, settings: Settings, used: int) -> str:
    """``/show``: the model, where it runs, the settings and how much of the window the prompt uses."""
    options = ", ".join(f"{k}={v}" for k, v in asdict(settings.sampling()).items())
    plan = getattr(engine, "kernels", "")  # a quantized model's: the activation dtype is named there
    return (
        f"model: {engine.name}\ndevice: {placement(engine)}\n"
        + (f"kernels: {plan}\n" if plan else "")
        + f"settings: {options}\n"
        f"context used: {used} / {engine.window} tokens (+ up to {settings.max_new_tokens} for the reply)"
    )


def _history_lines(turns: list[Turn], start: int) -> list[str]:
    """``/history``: each turn under its label, continuation lines indented, turns before ``start`` marked."""
    lines = []
    for index, turn in enumerate(turns):
        mark = " [interrupted]" if turn.interrupted else ""
        left_out = " (left out of the prompt)" if index < start else ""
        label = f"{turn.speaker}: "
        text = escape_controls(turn.text).replace("\n", "\n" + " " * cell_len(label))
        lines.append(f"{label}{text}{mark}{left_out}")
    return lines


def _with_setting(settings: Settings, key: str, value: str, window: int) -> Settings:
    """``/set KEY VALUE``: the settings with the checked value, or a UsageError saying why not."""
    if key not in SAMPLING_KEYS:
        raise UsageError(f"/set: unknown setting {key!r}; known: {', '.join(SAMPLING_KEYS)}")
    changed = settings.with_value(key, value, "/set")
    try:
        check_fits(0, changed.max_new_tokens, window)
    except UsageError as err:
        raise UsageError(f"/set: {err}") from None
    return changed


def _restored(
    settings: Settings, stored: dict, keep: Collection[str], window: int, notice: Callable[[str], None]
) -> tuple[Settings, list[str]]:
    """The stored sampling settings taken over ``settings`` but those in ``keep``; invalid ones skipped with a notice."""
    changed = []
    for key in SAMPLING_KEYS:
        if key in keep or key not in stored or stored[key] == getattr(settings, key):
            continue
        try:
            candidate = settings.with_value(key, stored[key], "stored settings")
            check_fits(0, candidate.max_new_tokens, window)
        except UsageError as err:
            notice(f"{err}; kept {key} = {getattr(settings, key)}")
            continue
        settings = candidate
        changed.append(f"{key}={getattr(settings, key)}")
    return settings, changed


def _save_to(path: str, force: bool, turns: list[Turn], model: str, settings: dict) -> Path:
    """``/save [PATH]`` and ``/save! PATH``: the file written."""
    if not path:
        return _save_new(turns, model, settings)
    try:
        return store.save_transcript(Path(path), turns, model, settings, replace=force)
    except FileExistsError:
        raise UsageError(f"{Path(path).expanduser()} already exists; /save! {path} replaces it") from None


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
        line = decode(raw, f"standard input line {number}").rstrip("\r\n")
        if line.strip() and not chat.handle(line):
            break
    return chat.exit_code
