"""Command modules of `adm submit` and `adm pipeline` (found by launch.cli through its table)."""
