"""Entry point: `python cluster/ensemble.py --help`; the code is `setdiv_cluster.ensemble`."""

import sys

from setdiv_cluster.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
