"""The off-policy schedule of the asynchronous pipeline: how far generation may run ahead of the learner.

Clock. The controller counts steps (batches of ``B = learner.prompts_per_step`` trees). One step makes
``k = ppo_epochs · B / mini_batch_prompts`` policy versions (optimizer steps; :func:`versions_per_step`,
1 by default). The staleness bound ``algo.max_staleness`` is given in policy versions; as whole
controller steps it is ``S = max_staleness // k`` (:func:`staleness_in_steps`). Counting steps rather
than raw versions keeps the schedule alive when the learner refuses a non-finite step (the version
does not move, the step does).

Admission rule (:func:`admission_budget`). With ``v`` the step at which the controller published the
weights a generator samples under and ``D`` the trees the controller discarded so far whose prompt
is used up (dynamic-sampling drops: they used budget without advancing the step; a stale tree's
prompt is re-issued instead and takes its own place again), new prompts are
admitted while ``(S + v + 1)·B + D − (accepted + running) > 0``. ``accepted + running`` is counted over
ALL generators from Redis (prompts handed out minus prompts waiting for re-issue), so G generators
together stay inside the bound (up to claims racing in the same instant: the read and the claim are
two calls; the controller's staleness filter catches the rare excess). With ``S = 0`` this is the
synchronous schedule: exactly ``B`` trees (plus replacements for drops) per step. ``D`` is an
addition to the rule as usually written: without it, a step whose trees were partly filtered out
would wait forever for trees nobody is allowed to sample.

Sync bound (:func:`check_sync_every`). Generators admit trees by the weights they hold, so weights
must be published at least every ``S + 1`` steps (``sync.every_steps <= S + 1``); otherwise the
learner waits for trees nobody may sample. Config validation refuses such a config for
``driver=ray``.

Staleness of a leaf (versions behind the learner) is defined in :mod:`learner.selection`.

Pure: imports nothing but the error type at run time (config validation calls it); the config
types are imported for annotations only, since :mod:`common.config.validation` imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    from common.config.schema import TrainConfig
    from common.config.training import LearnerConfig


def versions_per_step(learner_cfg: LearnerConfig) -> int:
    """Policy versions (optimizer steps) one controller step makes: ``ppo_epochs · B / mini-batch``."""
    return max(1, learner_cfg.ppo_epochs * (learner_cfg.prompts_per_step // learner_cfg.mini_batch_prompts))


def staleness_in_steps(cfg: TrainConfig) -> int:
    """``algo.max_staleness`` (policy versions) as whole controller steps."""
    return cfg.algo.max_staleness // versions_per_step(cfg.learner)


def admission_budget(
    max_staleness: int, version: int, prompts_per_step: int, accepted: int, running: int, dropped: int = 0
) -> int:
    """How many more prompts may be admitted now: ``(S + v + 1)·B + D − (accepted + running)``, ≥ 0."""
    return max(0, (max_staleness + version + 1) * prompts_per_step + dropped - accepted - running)


def max_sync_every(cfg: TrainConfig) -> int:
    """The largest ``sync.every_steps`` the staleness bound can feed: ``S + 1``."""
    return staleness_in_steps(cfg) + 1


def check_sync_every(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` when ``sync.every_steps`` exceeds :func:`max_sync_every`."""
    bound = max_sync_every(cfg)
    if cfg.sync.every_steps > bound:
        k = versions_per_step(cfg.learner)
        raise ConfigError(
            f"sync.every_steps={cfg.sync.every_steps} is more than algo.max_staleness={cfg.algo.max_staleness} "
            f"allows ({k} policy version(s) per step: at most {bound}): generators admit trees by the weights "
            f"they hold, so the learner would wait for trees nobody may sample; set sync.every_steps <= {bound} "
            "or raise algo.max_staleness"
        )
