"""Where the CLI writes: one rich console for every command."""

from __future__ import annotations

import sys

from rich.console import Console

# Tables are wide; when output is not a terminal, do not squeeze them to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
