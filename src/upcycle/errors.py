"""The one exception type upcycle raises for bad input.

Every message names the file, tensor or argument at fault and what was expected, so the CLI
can print it as is.
"""


class UpcycleError(ValueError):
    """Bad input: a checkpoint, argument, data file or model that upcycle cannot use."""


class UpcycleWarning(UserWarning):
    """Input upcycle can use but that is likely a mistake (e.g. held-out data equal to the
    training data); the CLI prints it as one line ``upcycle VERB: warning: ...``."""
