"""Whole operations behind the CLI: create, info, map, convert, compare.

Each module works on qcowpy.block devices and returns data (or yields output lines); the click
commands in qcowpy.cli only parse arguments, print and map errors to exit codes.
"""
