"""`python -m benchmarks ...` is `raygate bench ...`."""

import sys

from benchmarks.cli import main

sys.exit(main(prog="python -m benchmarks"))
