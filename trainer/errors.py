"""Errors the user fixes: a data file, a setting, a run dir in use.

The stage scripts show such an error as one line and exit with status 2, the traceback going to the run's log.txt
(trainer/cli.py); any other exception keeps its traceback on the console.
"""


class InputError(Exception):
    """Bad input (a file, a setting, a run dir another process trains): the message names it and says how to fix it."""


class DataError(InputError, ValueError):
    """A data file that cannot be used as it is; the message names the file and the line or item."""
