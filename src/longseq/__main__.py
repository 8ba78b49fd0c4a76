"""``python -m longseq ...`` (and ``torchrun ... -m longseq train ...``) run the command-line interface."""

import sys

from .cli import main

sys.exit(main())
