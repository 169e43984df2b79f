"""Entry point: `python cluster/submit.py --help`; the code is `setdiv_cluster.submit`."""

import sys

from setdiv_cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
