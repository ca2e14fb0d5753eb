"""SpindleKV: pyramid token budgets plus a codebook that shares near-duplicate keys and values.

``spindlekv`` holds the method; ``spindle_plan`` and ``spindle_prefill`` choose what each layer
keeps; ``codebook*`` and ``grown`` store and attend over the shared entries (``csrc/`` holds the
fused CPU kernels, ``codebook_triton*`` the GPU ones).
"""

from methods.cache.spindlekv.spindlekv import SpindleKV

__all__ = ["SpindleKV"]
