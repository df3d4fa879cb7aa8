"""`python -m moa_jax.train --config configs/train/<name>.yaml [--flag value ...]`"""

import sys

from moa_jax.cli import run
from moa_jax.train.loop import main

if __name__ == "__main__":
    sys.exit(run(main))
