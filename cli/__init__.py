"""Typer command-line apps ``envpipe`` and ``envpipe-agent`` (installed as envpipe_cli). Thin: parse, call, render."""
