"""``python -m iothreads.worker``: one iothread process (started by the main loop)."""

import sys

from ._worker import main

sys.exit(main())
