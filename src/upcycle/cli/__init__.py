"""The ``upcycle`` command line: thin subcommands that parse, call the library and report."""
