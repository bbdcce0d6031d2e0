"""``python -m vlp ...`` (and ``torchrun -m vlp train ...``) is the ``vlp`` command."""

import sys

from vlp.cli import main

sys.exit(main())
