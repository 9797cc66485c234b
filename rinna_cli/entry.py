"""The ``rinna`` executable: until the command line is imported and takes over, Ctrl-C ends it quietly (130).

Importing the command line (typer, rich, the settings) takes about 0.1 s; a Ctrl-C in it printed a
``KeyboardInterrupt`` traceback. The command line then handles Ctrl-C itself (rinna_cli.cli.run).
"""

from __future__ import annotations

import os
import signal


def main() -> None:
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # ignored (a background job, nohup): left so
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    from rinna_cli.cli import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)  # None: set in C
    run()
