"""oneDNN convolutions for JAX on CPU (optional; built on first use from ``conv_ffi.cc``).

Needs a C++ compiler and oneDNN (Debian/Ubuntu: ``apt-get install -y libdnnl-dev g++``).
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
