"""The one exception type upcycle raises for bad input.

Every message names the file, tensor or argument at fault and what was expected, so the CLI
can print it as is.
"""


class UpcycleError(ValueError):
    """Bad input: a checkpoint, argument, data file or model that upcycle cannot use."""
