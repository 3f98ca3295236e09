"""A learner's view of what an engine generated: a :class:`learner.batching.LeafSequence` from a prompt
and a :class:`actors.backends.base.GenResult` (the engine-vs-learner log-prob tests)."""

from __future__ import annotations

from typing import Any

import numpy as np

from learner.batching import LeafSequence


def generated_sequence(prompt: list[int], out: Any, version: int = 1) -> LeafSequence:
    """``prompt`` + the tokens of ``out`` (a GenResult), with its behaviour log-probs, all sampled
    under ``version``, advantage 0."""
    return LeafSequence(
        token_ids=np.array(prompt + list(out.token_ids), dtype=np.int64),
        prompt_len=len(prompt),
        behavior_logprobs_R=np.array(out.logprobs, dtype=np.float32),
        versions_R=np.full(len(out.token_ids), version, dtype=np.int64),
        advantage=0.0,
    )
