"""The `fxq` command line: argument parsing and thin commands over the API."""

from fxq.cli.commands import main

__all__ = ["main"]
