"""treepo bench recipe's arms: the probability-driven allocation is an arm of its own (--arms), each
arm is compared with grpo, and an unknown arm is refused with the choices."""

from __future__ import annotations

import pytest

from cluster.bench import recipe
from cluster.cli import build_parser
from common.config import load_config


def _args(*argv: str):
    return build_parser().parse_args(["bench", "recipe", *argv])


def test_the_prob_arm_trains_trees_with_the_probability_driven_allocation(tmp_path):
    args = _args("--arms", "treepo,treepo-prob,grpo", "--out-dir", str(tmp_path), "learner.total_steps=2")
    base = recipe._check(args)
    assert recipe.arms(args) == ["treepo", "treepo-prob", "grpo"]
    cfg = load_config(None, recipe.run_overrides(args, "treepo-prob", 0, base.learner.total_steps))
    assert (cfg.tree.mode, cfg.tree.allocation, cfg.algo.advantage) == ("tree", "prob_low", "treepo")
    plain = load_config(None, recipe.run_overrides(args, "treepo", 0, base.learner.total_steps))
    assert plain.tree.allocation == "fixed_avg"


def test_every_arm_is_compared_with_grpo():
    curve = {"tokens": [10.0], "wall": [2.0], "accuracy": [0.5]}
    half = {"tokens": [5.0], "wall": [1.0], "accuracy": [0.6]}
    out = recipe.summarize({"treepo": {0: half}, "treepo-prob": {0: half}, "grpo": {0: curve}})
    for arm in ("treepo", "treepo-prob"):
        assert out[f"{arm}_over_grpo"]["decoded_tokens"] == pytest.approx(0.5)
        assert out[f"{arm}_over_grpo"]["final_accuracy_diff"] == pytest.approx(0.1)


def test_an_unknown_arm_is_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match=r"--arms 'treepo,ppo': choose among treepo, grpo, treepo-prob"):
        recipe._check(_args("--arms", "treepo,ppo", "--out-dir", str(tmp_path)))
