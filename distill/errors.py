"""The one exception type for bad input: it is reported as a single line, never as a traceback."""


class DistillError(Exception):
    """A problem with the user's input (config, paths, data, models) that stops the run."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message: enough to say what went wrong, in one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
