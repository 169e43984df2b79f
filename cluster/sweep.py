"""Entry point: `python cluster/sweep.py --help`; the code is `setdiv_cluster.sweep`."""

import sys

from setdiv_cluster.sweep import main

if __name__ == "__main__":
    sys.exit(main())
