"""``python -m decode_accel.cli ...``: the same as the ``decode-accel`` console script."""

import sys

from decode_accel.cli import main

sys.exit(main())
