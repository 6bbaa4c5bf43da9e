"""Thin shim so `python cli.py ...` works from a checkout; the CLI lives in specsight.cli."""

from specsight.cli import main

main()
