"""Small helpers every layer may use: JSON files, threads, machine info, plots."""
