"""Token partitions of MANGO's ICA layers (permutations: log-det 0, merge is the exact inverse).

The flow input is ``x = [A tokens ; B tokens]`` (N, L, D) with ``n = L/2`` tokens per modality. Within each
modality, ``·1`` are the even token indices and ``·2`` the odd ones. A partition names which tokens form
``x1`` (queries/keys, passed through unchanged) and which form ``x2`` (updated):

=======  ==============  ==============
name     x1              x2
=======  ==============  ==============
mmca1    A               B
mmca2    B               A
imca1    [A1; B1]        [A2; B2]
imca2    [A1; B2]        [A2; B1]
imca3    [A2; B1]        [A1; B2]
imca4    [A2; B2]        [A1; B1]
imca1r   [B1; A1]        [B2; A2]
imca2r   [B2; A1]        [B1; A2]
imca3r   [B1; A2]        [B2; A1]
imca4r   [B2; A2]        [B1; A1]
lica     first / second half of W·x, W a learned LU token mixer (see ``lica.py``)
=======  ==============  ==============

Why the ``r`` layouts (ours, not the paper's). ICA's update is ``y2 = x2 + α·(A x2)`` with A upper triangular in
x2's token order: row i mixes the values of tokens j ≥ i. In the paper's IMCA layouts A's tokens come first, so an
A row reads B's *content* (B's tokens are all "later") but a B row only ever reads later B tokens: B's update
never sees A's values (and in MMCA the values are one modality's own). The ``r`` layouts put B first — the same
pairs of x1/x2 tokens with the modality halves swapped — so B reads A's content; the preset ``twoway`` is the
paper's block with imca2 and imca4 replaced by imca2r and imca4r (same layer count, content flowing both ways in
every block). Still permutations: log-det 0, exact inverse.
"""

from __future__ import annotations

import torch

PARTITIONS: tuple[str, ...] = (
    "mmca1",
    "mmca2",
    "imca1",
    "imca2",
    "imca3",
    "imca4",
    "imca1r",
    "imca2r",
    "imca3r",
    "imca4r",
    "lica",
)

#: the paper's block layout, and named subsets for its Table 5 ablation (``model.partitions``)
PARTITION_PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("mmca1", "mmca2", "imca1", "imca2", "imca3", "imca4", "lica", "lica"),
    "mmca": ("mmca1", "mmca2"),
    "imca": ("imca1", "imca2", "imca3", "imca4"),
    "lica": ("lica", "lica"),
    "mmca+imca": ("mmca1", "mmca2", "imca1", "imca2", "imca3", "imca4"),
    "twoway": ("mmca1", "mmca2", "imca1", "imca2r", "imca3", "imca4r", "lica", "lica"),
}


def resolve_partitions(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A preset name, a ``+``/``,``-joined list, or a sequence of partition names → a tuple of names."""
    if isinstance(spec, str):
        if spec in PARTITION_PRESETS:
            return PARTITION_PRESETS[spec]
        spec = [p for p in spec.replace("+", ",").split(",") if p]
    names = tuple(spec)
    bad = [p for p in names if p not in PARTITIONS]
    if bad or not names:
        raise ValueError(
            f"unknown partition(s) {bad or spec!r}: use one of {list(PARTITIONS)} or a preset {list(PARTITION_PRESETS)}"
        )
    return names


def partition_index(name: str, tokens: int) -> torch.Tensor:
    """Gather index ``idx`` (tokens,) with ``x[:, idx[:n]] = x1`` and ``x[:, idx[n:]] = x2``."""
    if name not in PARTITIONS or name == "lica":
        raise ValueError(f"partition_index: '{name}' is not a fixed permutation; use one of {list(PARTITIONS[:-1])}")
    if tokens % 2:
        raise ValueError(f"{name}: token count must be even (two modalities of n tokens each); got {tokens}")
    n = tokens // 2
    if name.startswith("imca") and n % 2:
        raise ValueError(
            f"{name}: IMCA needs an even token count per modality (even/odd split); got n={n} (L={tokens})"
        )
    a, b = torch.arange(n), torch.arange(n, tokens)
    a1, a2, b1, b2 = a[0::2], a[1::2], b[0::2], b[1::2]
    order = {
        "mmca1": (a, b),
        "mmca2": (b, a),
        "imca1": (a1, b1, a2, b2),
        "imca2": (a1, b2, a2, b1),
        "imca3": (a2, b1, a1, b2),
        "imca4": (a2, b2, a1, b1),
        "imca1r": (b1, a1, b2, a2),
        "imca2r": (b2, a1, b1, a2),
        "imca3r": (b1, a2, b2, a1),
        "imca4r": (b2, a2, b1, a1),
    }[name]
    return torch.cat(order)
