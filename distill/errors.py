"""The one exception type for bad input: it is reported as a single line, never as a traceback."""


class DistillError(Exception):
    """A problem with the user's input (config, paths, data, models) that stops the run."""
