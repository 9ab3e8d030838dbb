"""``python -m mainloop``: the ``iothreads`` command."""

import sys

from .cli._main import main

sys.exit(main())
