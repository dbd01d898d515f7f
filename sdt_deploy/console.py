"""The terminal the tables go to: rich, and wide enough when stdout is a pipe or a file (rich assumes
80 columns there, which would cut the layer names)."""
from __future__ import annotations

import shutil
import sys


def console():
    from rich.console import Console

    width = None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 40)).columns)
    return Console(width=width)
