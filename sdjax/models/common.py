"""Compatibility re-exports: the pieces that lived here are now in one module per job.

``base`` (shared fields, checks, rates, keys), ``conv_norm`` (``Conv``, shortcut), ``stages``
(``apply_stage``, layout converters), ``gates`` (``batch_gates``). Import from those modules.
"""

from sdjax.models.base import (
    StochasticDepthFields,
    check_input,
    dataclass_fields,
    model_key,
)
from sdjax.models.conv_norm import Conv, conv_kernel_init, pad_channels_shortcut
from sdjax.models.gates import batch_gates
from sdjax.models.stages import apply_stage, scan_to_unrolled, unrolled_to_scan

__all__ = [
    "Conv",
    "StochasticDepthFields",
    "apply_stage",
    "batch_gates",
    "check_input",
    "conv_kernel_init",
    "dataclass_fields",
    "model_key",
    "pad_channels_shortcut",
    "scan_to_unrolled",
    "unrolled_to_scan",
]
