"""`python -m ternlm.train ...` and `torchrun --nproc-per-node N -m ternlm.train ...`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
