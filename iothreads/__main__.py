"""``python -m iothreads``: the ``iothreads`` command (``launch``, ``bench``).

The command is the distribution's face and carries its name, so ``python -m
iothreads`` runs it, as ``python -m pip`` runs pip. It lives in ``mainloop``
(it starts a main loop); this entry point is the one module of ``iothreads``
that imports ``mainloop`` (the layering test names it), and nothing imports it.
"""

import sys

from mainloop.cli import main

sys.exit(main())
