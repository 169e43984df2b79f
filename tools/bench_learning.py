"""Learning-quality benchmark: does training make the set model (K = 4) beat one embedding?
The code is the `tools/learning_bench/` package (its docstring says what each part does).

    python tools/bench_learning.py [--runs k4:off,k1:off] [--seeds 0,1] [--quick] [--help]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from learning_bench.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
