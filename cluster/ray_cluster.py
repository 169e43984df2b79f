"""Entry point: `python cluster/ray_cluster.py --help`; the code is `setdiv_cluster.ray_cluster`."""

import sys

from setdiv_cluster.ray_cluster import main

if __name__ == "__main__":
    sys.exit(main())
