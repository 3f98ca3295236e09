"""How leaf sequences become model inputs: one :class:`Packer` per ``learner.packing`` mode.

``learner.packing`` chooses how leaf sequences (:class:`learner.batching.LeafSequence`) become model
inputs:

- ``none``: one right-padded row per leaf (:mod:`learner.padded`); a token shared by k leaves is
  computed k times, and every row is padded to the longest of its micro-batch.
- ``flat``: padding-free. The sequences of a micro-batch are concatenated into ONE row; each keeps its
  own position ids (0, 1, ...) and attends to itself only (:mod:`learner.packed`).
- ``tree``: prefix-shared. Sequences with the same prompt are merged into a prefix tree; every
  distinct token runs through the model once and attends to its own root path only, so the logits of
  every leaf are exactly what that leaf's own padded row gives (:mod:`learner.packed`, attention in
  :mod:`learner.packed_attention`).

The learner rank holds one packer, made once by :func:`make_packer` from :data:`PACKERS` (mode ->
class), and drives every mode the same way: :meth:`Packer.plan` the micro-batches, :meth:`Packer.collate`
each into a batch, :meth:`Packer.forward` it, then :meth:`Packer.logprobs` on the (temperature-scaled,
float32) logits gives the response targets' logprobs laid out for :func:`learner.loss.policy_loss`
(``mask`` marks the valid targets), and :meth:`Packer.response_logprobs` one sequence's of them. A new
mode is a class here and one entry in :data:`PACKERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from common.errors import ConfigError
from learner.batching import LeafSequence
from learner.packed import FlatPacker, TreePacker
from learner.padded import PaddedPacker


class Packer(Protocol):
    """One ``learner.packing`` mode. Made with ``(attention, pad_id)``: ``learner.packed_attention``
    and the model's padding token id (each mode takes what it needs)."""

    mode: str  # its learner.packing value

    def prepare_model(self, module: torch.nn.Module) -> None:
        """Make a HF causal LM take this mode's inputs (ConfigError naming the fix if it cannot)."""

    def plan(self, seqs: Sequence[LeafSequence], budget: int) -> list[list[int]]:
        """Micro-batches as index groups covering ``seqs``, each within ``budget`` (micro_batch_tokens)
        computed tokens where it can be; the same data always gives the same grouping."""

    def collate(self, seqs: Sequence[LeafSequence], current_version: int = 0) -> dict:
        """One micro-batch's tensors: ``input_ids`` (its model positions) and the per-target fields of
        :func:`learner.loss.policy_loss` (``mask``, ``behavior_logprobs``, ``advantages``,
        ``staleness``, and ``prox_logprobs``/``ref_logprobs`` when every sequence has them)."""

    def forward(
        self, model: torch.nn.Module, module: torch.nn.Module, batch: dict, device: torch.device
    ) -> torch.Tensor:
        """Run ``model`` (``module``: the HF model inside it) on ``batch``; the logits the targets need."""

    def logprobs(
        self, logits: torch.Tensor, batch: dict, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs (and entropies) of the targets, laid out like ``batch["mask"]``."""

    def response_logprobs(self, logp: torch.Tensor, row: int, seq: LeafSequence) -> np.ndarray:
        """Sequence ``row`` of the batch: its response tokens' logprobs (float32 [R])."""

    def computed_tokens(self, seqs: Sequence[LeafSequence]) -> int:
        """Model positions a micro-batch of ``seqs`` runs (padding included)."""


# mode -> class; a class is made with (learner.packed_attention, the model's padding token id)
PACKERS: dict[str, Callable[[str, int], Packer]] = {
    "tree": TreePacker,
    "flat": FlatPacker,
    "none": PaddedPacker,
}
PACKINGS = tuple(PACKERS)


def make_packer(packing: str, attention: str = "auto", pad_id: int = 0) -> Packer:
    """The packer of ``learner.packing`` (ConfigError for an unknown mode or attention back-end)."""
    if packing not in PACKERS:
        raise ConfigError(f"learner.packing={packing!r} is not one of {PACKINGS}: set learner.packing")
    return PACKERS[packing](attention, pad_id)


def computed_tokens(seqs: Sequence[LeafSequence], packing: str) -> int:
    """Model positions a micro-batch of ``seqs`` runs under ``packing`` (padding included)."""
    return make_packer(packing).computed_tokens(seqs)
