"""ssdkit: structured state-space (SSD) recurrences in plain JAX.

Core primitives (one JAX source for CPU, GPU and TPU):

* :func:`ssd_scan` — chunked prefill (dual form inside chunks, linear scan across chunks);
* :func:`ssd_step` — O(1) single-step decode update;
* :func:`ssd_reference` — the sequential oracle;
* :class:`Recurrence` — the structural conditions, with input validation.
"""

from ssdkit.dtypes import accumulation_dtype
from ssdkit.recurrence import DecayKind, Recurrence
from ssdkit.reference import ssd_reference
from ssdkit.scan import ssd_scan
from ssdkit.step import ssd_step

__all__ = [
    "DecayKind",
    "Recurrence",
    "accumulation_dtype",
    "ssd_reference",
    "ssd_scan",
    "ssd_step",
]
__version__ = "0.1.0"
