"""The argparse every `drope` subcommand uses: a mistake is one line (SpecError, exit 2 through the
CLI) naming the option, never argparse's usage block."""

from __future__ import annotations

import argparse

from drope_ops.errors import SpecError


class Parser(argparse.ArgumentParser):
    """argparse that raises SpecError instead of printing usage and exiting."""

    def error(self, message):
        raise SpecError(f"{message}; run `{self.prog} --help` for the options")
