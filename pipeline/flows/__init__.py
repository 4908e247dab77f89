"""Exact MANGO flow layers. Every layer keeps the contract stated in :mod:`pipeline.flows.base`."""

from .actnorm import ActNorm, data_init
from .base import FlowSequence, InvertibleModule
from .coupling import AffineCoupling
from .ica import ICA, solve_gated_upper
from .lica import LUTokenMixer
from .mango import MangoBlock, MangoFlow
from .multiscale import MultiscaleMangoFlow, quantize
from .partitions import PARTITION_PRESETS, PARTITIONS, partition_index, resolve_partitions

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FlowSequence",
    "ICA",
    "InvertibleModule",
    "LUTokenMixer",
    "MangoBlock",
    "MangoFlow",
    "MultiscaleMangoFlow",
    "PARTITIONS",
    "PARTITION_PRESETS",
    "data_init",
    "partition_index",
    "quantize",
    "resolve_partitions",
    "solve_gated_upper",
]
