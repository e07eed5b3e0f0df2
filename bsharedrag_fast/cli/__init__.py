"""The `bsharedrag` command line (main.py) and the options its commands share (args.py)."""
