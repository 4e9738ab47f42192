"""`python -m benchmarks.efficiency`: see `benchmarks.efficiency.cli`."""

import sys

from benchmarks.efficiency.cli import main

if __name__ == "__main__":
    sys.exit(main())
