"""Errors that the CLI turns into a one-line message and an exit code."""

# How allocation failures read: torch.OutOfMemoryError, CUDA/MPS "out of memory", the CPU
# allocator's "can't allocate memory" / "not enough memory", errno 12 "Cannot allocate memory".
_OOM_WORDS = ("out of memory", "can't allocate", "cannot allocate", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (torch's, the CPU allocator's or the OS's); torch-free."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, OSError)) and any(word in text for word in _OOM_WORDS)


class RinnaError(Exception):
    """A failure the user can act on; ``str(err)`` is the one-line message."""

    exit_code = 1


class UsageError(RinnaError):
    """Bad input or options (exit 2)."""

    exit_code = 2


class ModelError(RinnaError):
    """The model could not be found, read or loaded (exit 1)."""
