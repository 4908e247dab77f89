"""Exact MANGO flow layers. Every layer keeps the contract stated in :mod:`pipeline.flows.base`."""

from .actnorm import ActNorm, data_init
from .base import FlowSequence, InvertibleModule, token_mask
from .channel_mix import ChannelMixer
from .coupling import AffineCoupling
from .ica import ATTENTION, ICA, solve_gated_upper
from .kernels import native
from .kernels.attention import diag_log_softmax, upper_attention
from .lica import LUTokenMixer
from .mango import MEMORY_POLICIES, MangoBlock, MangoFlow
from .multiscale import MultiscaleMangoFlow, quantize
from .partitions import PARTITION_PRESETS, PARTITIONS, partition_index, resolve_partitions

__all__ = [
    "ATTENTION",
    "ActNorm",
    "AffineCoupling",
    "ChannelMixer",
    "FlowSequence",
    "ICA",
    "InvertibleModule",
    "LUTokenMixer",
    "MEMORY_POLICIES",
    "MangoBlock",
    "MangoFlow",
    "MultiscaleMangoFlow",
    "PARTITIONS",
    "PARTITION_PRESETS",
    "data_init",
    "native",
    "diag_log_softmax",
    "partition_index",
    "quantize",
    "resolve_partitions",
    "solve_gated_upper",
    "token_mask",
    "upper_attention",
]
