"""Errors for user mistakes. The command line prints these as one line and exits non-zero."""


class SimfluenceError(ValueError):
    """A mistake in the user's input (a file, a run, a curriculum, an option).

    The message names the file, run, step or field at fault; the command line prints it
    without a traceback.
    """


class RunLogError(SimfluenceError):
    """A run log on disk or in memory is malformed."""


class CurriculumError(SimfluenceError):
    """A curriculum cannot be simulated (unknown ids, empty batches, bad shape)."""
