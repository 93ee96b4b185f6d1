"""The one exception type for bad input: it is reported as a single line, never as a traceback."""

import sys


class DistillError(Exception):
    """A problem with the user's input (config, paths, data, models) that stops the run."""


class ConfigErrors(DistillError):
    """Every error found in a config, reported at once, in one line."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__(messages[0] if len(messages) == 1 else f"{len(messages)} config errors: " + "; ".join(messages))


def collect_errors(checks) -> None:
    """Run every check (a callable); raise one ``ConfigErrors`` for all that failed."""
    messages: list[str] = []
    for check in checks:
        try:
            check()
        except DistillError as exc:
            messages.extend(getattr(exc, "messages", [str(exc)]))
    if messages:
        raise ConfigErrors(messages)


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message: enough to say what went wrong, in one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def print_error(message: str) -> None:
    """``distill: error: message`` on stderr, on a line of its own: a progress bar the failure left open
    is closed first (its line ends there) instead of having the error appended to it."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    print(f"distill: error: {message}", file=sys.stderr, flush=True)
