"""oneDNN convolutions for JAX on CPU (optional; built on first use from ``conv_ffi.cc``).

Needs oneDNN, which ``pip install sdjax`` brings on x86-64 Linux (the ``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp`` wheels), and a C++ compiler (``g++``). Without them
``impl="auto"`` uses the XLA path and logs one warning line saying why.
`sdjax.conv.conv2d` uses this route with ``impl="onednn"`` and, when `available`, with
``impl="auto"`` on CPU. ``python -m sdjax.onednn build`` builds the handlers ahead of time.
"""

from sdjax.onednn.conv import (
    DTYPES,
    available,
    conv2d,
    has_fast_kernels,
    impl_info,
    missing_implementation,
    unavailable_reason,
)
from sdjax.onednn.library import INSTALL_HINT, build, library_path

__all__ = [
    "DTYPES",
    "INSTALL_HINT",
    "available",
    "build",
    "conv2d",
    "has_fast_kernels",
    "impl_info",
    "missing_implementation",
    "library_path",
    "unavailable_reason",
]
