"""Convert SCAN features, Karpathy JSON + images or the synthetic dataset into shards.

python tools/make_shards.py precomp --root data/coco_precomp --split train --out shards/coco
python tools/make_shards.py karpathy --json dataset_coco.json --images coco/ --split test \
        --out shards/coco_img
python tools/make_shards.py synthetic --split train --images 10000 --out shards/synth
"""

import logging
import sys

from setdiv.data.make_shards import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
