"""``python -m lorafit`` (and ``torchrun -m lorafit``): the same as the ``lorafit`` console script."""

import sys

from lorafit.cli import main

sys.exit(main())
