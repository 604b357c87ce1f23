"""nanokor's errors: one base class, so every command line catches one type and prints one paragraph.

Each message says what is wrong and how to fix it; the commands print it without a traceback. The exit
code says whose move it is: 2 (argparse's) for input to fix, 1 for a started training run that could
not go on. Anything else that escapes is a bug in nanokor, and keeps its traceback.
"""

import os
import sys


class NanokorError(Exception):
    """A problem the user can fix; the message is one paragraph that says how."""

    exit_code = 2


class ConfigError(NanokorError, ValueError):
    """A configuration value that is unknown, mistyped, out of range or inconsistent."""


class DataError(NanokorError):
    """Bad input to the data pipeline: a source, a prepared directory or its files."""


class ShardError(DataError):
    """A shard that cannot be used as is: wrong file, truncated, or made with another tokenizer."""


class CheckpointError(NanokorError):
    """A checkpoint that is missing, unreadable, from an incompatible format, or cannot be written."""


class TrainingError(NanokorError):
    """A run that cannot go on: too many non-finite steps, or an out_dir another run is using."""

    exit_code = 1


class OutputError(NanokorError, OSError):
    """An output path that cannot be written (its directory is a file, or not writable). Also the OSError
    behind it (errno, strerror, filename), so a command that words its own message for a failed write
    still catches it."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror, cause.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ExportError(NanokorError):
    """A checkpoint that cannot be exported as an equivalent model for another tool."""


class EvalError(NanokorError):
    """Bad input to the evaluation command."""


class PromptError(NanokorError):
    """A prompt that cannot be generated from: unreadable, empty after tokenization, or too long."""


class ChatError(NanokorError):
    """A conversation that cannot be rendered, or a tokenizer without the chat tokens."""


class ServeError(NanokorError):
    """The server cannot start: its optional dependencies (the serve extra) are missing."""


class PlotError(NanokorError):
    """Nothing to plot, or a plot that cannot be drawn from the given run."""


def exit_on_error(main, *args) -> int:
    """Run a command's `main` and return its exit code (its own int, else 0); a NanokorError becomes
    `error: <paragraph>` on stderr and its class's `exit_code`."""
    try:
        code = main(*args)
    except NanokorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return code if isinstance(code, int) else 0


def exit_streaming(main, *args) -> int:
    """exit_on_error for a command that streams text to stdout (sample, chat): Ctrl-C exits with 130, and a
    reader that left (`| head`) ends it quietly, with stdout pointed at /dev/null so exit's flush cannot
    fail too."""
    try:
        return exit_on_error(main, *args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
