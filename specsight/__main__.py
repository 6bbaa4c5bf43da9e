"""`python -m specsight ...` runs the command line."""

from specsight.cli import main

main()
