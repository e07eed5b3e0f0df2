"""python -m bsharedrag_fast.cli ..."""
import sys

from .main import main

sys.exit(main())
