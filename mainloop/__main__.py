"""``python -m mainloop``: the ``iothreads`` command."""

import sys

from .cli import main

sys.exit(main())
