"""The chat's slash commands: one pure parser that never raises."""

from __future__ import annotations

from dataclasses import dataclass

# name -> (argument usage, help); aliases map onto these names.
COMMANDS = {
    "help": ("", "list the commands"),
    "reset": ("", "start a new conversation (alias /clear)"),
    "undo": ("", "remove the last exchange"),
    "retry": ("", "generate the last reply again (or the reply to a message left unanswered)"),
    "history": ("", "show the conversation"),
    "save": (
        "[PATH]",
        "write the conversation as a JSON transcript (default: the app directory); /save! PATH replaces a file",
    ),
    "load": ("PATH", "continue a saved transcript"),
    "set": ("KEY VALUE", "change a setting: temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed"),
    "show": ("", "model, device, dtype, settings and context used"),
    "stats": ("", "tokens, time to first token and tokens/s of the last reply"),
    "exit": ("", "quit (also /quit, Ctrl-D)"),
}
ALIASES = {"clear": "reset", "quit": "exit", "bye": "exit", "?": "help"}


@dataclass(frozen=True)
class Message:
    """A line to send to the model."""

    text: str


@dataclass(frozen=True)
class Command:
    """A slash command; ``force``: written with a ``!`` (``/save! PATH`` replaces an existing file)."""

    name: str
    args: tuple[str, ...] = ()
    force: bool = False


@dataclass(frozen=True)
class Invalid:
    """A line that looked like a command but is not one; ``hint`` says what to do."""

    hint: str


def names() -> list[str]:
    """Every command as typed, aliases included, for Tab completion."""
    return [f"/{name}" for name in [*COMMANDS, *ALIASES] if name != "?"]


def help_text() -> str:
    width = max(len(f"/{name} {usage}".strip()) for name, (usage, _) in COMMANDS.items())
    lines = [f"  {f'/{name} {usage}'.strip():<{width}}  {text}" for name, (usage, text) in COMMANDS.items()]
    lines.append(
        "  Enter sends; Alt+Enter (or Esc Enter) starts a new line; start a message with // to send a leading /"
    )
    return "\n".join(lines)


def parse(line: str) -> Message | Command | Invalid:
    """What ``line`` asks for: a message, a known command with its arguments, or an invalid command."""
    if line.startswith("//"):
        return Message(line[1:])
    if not line.startswith("/"):
        return Message(line)
    word, _, rest = line[1:].partition(" ")
    force = word.endswith("!") and word[:-1].lower() == "save"
    name = "save" if force else ALIASES.get(word.lower(), word.lower())
    if name not in COMMANDS:
        return Invalid(f"unknown command /{word}; /help lists the commands (start with // to send a message)")
    rest = rest.strip()
    if name == "set":
        key, _, value = rest.partition(" ")
        if not key or not value.strip():
            return Invalid("usage: /set KEY VALUE, e.g. /set temperature 0.5")
        return Command(name, (key.replace("-", "_").lower(), value.strip()))
    if name == "load" and not rest:
        return Invalid("usage: /load PATH")
    if name in ("save", "load"):
        if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "'\"":  # quoted as in a shell: the path inside
            rest = rest[1:-1]
        return Command(name, (rest,) if rest else (), force)
    if rest:
        return Invalid(f"/{name} takes no arguments")
    return Command(name)
