"""Training-step benchmark (full vs intra_doc vs anchor); thin wrapper over :mod:`anchorcontext.bench`.

Same as ``anchorcontext bench ARGS``; runs from a checkout without installing (``python benchmarks/train_step.py``)::

    python benchmarks/train_step.py --preset quick --out benchmarks/results/train_step_quick.json
    python benchmarks/train_step.py --preset cpu --out benchmarks/results/train_step_cpu.json
    python benchmarks/train_step.py --preset gpu-1b --device cuda --out $OUT/train_step_cuda.json

``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorcontext.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
