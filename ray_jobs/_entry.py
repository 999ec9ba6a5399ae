"""Shared body of the ``ray_jobs`` entry points: the CLI's parsing and printing for one command."""

from __future__ import annotations

import sys

from selectmoe.cli import main


def run(command: str) -> None:
    sys.exit(main([command, *sys.argv[1:]]))
