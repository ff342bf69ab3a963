"""Quantised frozen weights: bitsandbytes-compatible 4-bit NF4/FP4 (:mod:`jpeft.quant.nf4`)."""

from jpeft.quant import nf4
from jpeft.quant.nf4 import NF4Weight

__all__ = ["NF4Weight", "nf4"]
