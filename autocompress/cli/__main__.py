"""``python -m autocompress.cli``: the ``autocompress`` program."""

import sys

from .program import main

sys.exit(main())
