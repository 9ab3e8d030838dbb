"""The ``iothreads`` command: ``launch``, ``bench`` and their option parsing."""

from __future__ import annotations

from ._embedded import ClusterHandle as ClusterHandle
from ._embedded import EmbeddedCluster as EmbeddedCluster
from ._bench import add_bench_arguments as add_bench_arguments
from ._bench import run_bench as run_bench
from ._main import main as main
from ._options import BlockdevSpec as BlockdevSpec
from ._options import OptionError as OptionError
from ._options import parse_blockdev as parse_blockdev
from ._options import parse_keyval as parse_keyval
from ._options import parse_object as parse_object
from ._options import parse_size as parse_size

__all__ = [
    "BlockdevSpec",
    "ClusterHandle",
    "EmbeddedCluster",
    "OptionError",
    "add_bench_arguments",
    "main",
    "parse_blockdev",
    "parse_keyval",
    "parse_object",
    "parse_size",
    "run_bench",
]
