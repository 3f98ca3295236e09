"""Held-out evaluation: k answers per problem (flat or tree sampling), scored the paper's way.

Per problem: mean@k (share of correct answers), pass@k (unbiased estimator; with exactly k samples
it is "any correct"), maj@k (bootstrap majority vote, 1000 draws, seed 42). Per file and overall
(weighted by problem count). A sample is correct when the reward's verdict says so (``Leaf.correct``,
see :mod:`actors.scoring`); evaluation rewards are :func:`actors.engine_inputs.eval_reward`'s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.backends.base import GenerationBackend
from actors.engine_inputs import prompt_metadata
from actors.sampler import TreeSampler
from actors.scoring import leaf_texts, score_trees
from common.config import SamplingConfig, TreeConfig
from common.eval_metrics import maj_at_k, majority_vote, pass_at_k
from common.rewards import RewardFn
from common.sampling_metrics import SamplingStats
from common.stops import StopRule


@dataclass
class ProblemResult:
    prompt_id: str
    answer: str
    answers: list[str | None]
    correct: list[bool]
    majority: str | None
    mean_at_k: float
    pass_at_k: float
    maj_at_k: float
    texts: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    problems: list[ProblemResult]
    k: int
    sampling: str
    wall_s: float
    decoded_tokens: int
    trajectories: int
    prefill_tokens_computed: int = 0
    trajectory_tokens: int = 0  # response tokens over all answers (shared prefixes counted per answer)

    def summary(self) -> dict[str, float]:
        n = len(self.problems)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "problems": float(n),
            f"mean@{self.k}": mean([p.mean_at_k for p in self.problems]),
            f"pass@{self.k}": mean([p.pass_at_k for p in self.problems]),
            f"maj@{self.k}": mean([p.maj_at_k for p in self.problems]),
            # share of samples that give a final \\boxed{} answer at all (format compliance)
            "answered": mean([mean([a is not None for a in p.answers]) for p in self.problems]),
            "decoded_tokens": float(self.decoded_tokens),
            "prefill_tokens_computed": float(self.prefill_tokens_computed),
            "trajectory_tokens": float(self.trajectory_tokens),
            "wall_s": self.wall_s,
            "trajectories_per_s": self.trajectories / self.wall_s if self.wall_s else 0.0,
        }

    def train_metrics(self) -> dict[str, float]:
        """The metrics a training run logs for this evaluation (``eval/...``)."""
        s = self.summary()
        out = {f"eval/{k}": v for k, v in s.items() if "@" in k}
        out["eval/accuracy"] = s[f"mean@{self.k}"]
        out["eval/answered"] = s["answered"]
        return out


def run_eval(
    backend: GenerationBackend,
    inputs: Any,
    prompts: Sequence[Any],
    reward: RewardFn,
    *,
    k: int | None = None,
    sampling: str = "flat",
    tree_cfg: TreeConfig | None = None,
    **kw: Any,
) -> EvalResult:
    """:func:`evaluate` with a run's settings: ``inputs`` is an :class:`actors.engine_inputs.EngineInputs`
    (its config's tree, sampling and ``generators.trees_in_flight``, its stop ids and decode);
    ``k`` defaults to ``eval.k``. ``kw`` goes to :func:`evaluate` (``keep_texts``, ``progress``)."""
    cfg = inputs.cfg
    return evaluate(
        backend, prompts, reward, tree_cfg=tree_cfg or cfg.tree, sampling_cfg=cfg.sampling,
        eos_ids=inputs.stop_ids, stop_strings=inputs.stop_strings, decode=inputs.decode,
        k=k or cfg.eval.k, sampling=sampling,
        max_in_flight=cfg.generators.trees_in_flight, tools=inputs.tool_turns, **kw,
    )  # fmt: skip


def eval_tree_config(tree_cfg: TreeConfig, k: int, sampling: str) -> TreeConfig:
    """The sampler shape for k answers per problem: flat = k independent samples; tree = w=k leaves."""
    if sampling == "flat":
        return dataclasses.replace(tree_cfg, mode="flat", w=k)
    rd_max = min(tree_cfg.root_divergence_max, k)
    return dataclasses.replace(
        tree_cfg,
        mode="tree",
        w=k,
        root_divergence_max=rd_max,
        root_divergence_min=min(tree_cfg.root_divergence_min, rd_max),
    )


def evaluate(
    backend: GenerationBackend,
    prompts: Sequence[Any],
    reward: RewardFn,
    *,
    tree_cfg: TreeConfig,
    sampling_cfg: SamplingConfig,
    eos_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    k: int,
    sampling: str = "flat",
    max_in_flight: int = 16,
    keep_texts: bool = False,
    progress: Callable[[int], None] | None = None,
    stop_strings: Sequence[str] = (),
    tools: Any = None,
) -> EvalResult:
    """Sample and score k answers for each ``EncodedPrompt`` (``.row`` with id/answer, ``.prompt_ids``).
    A response ends at its first stop token (``eos_ids``) or stop string (``stop_strings``); with
    ``tools`` (:class:`actors.tool_turns.ToolTurns`) its tool calls run as in training."""
    stats = SamplingStats()
    sampler = TreeSampler(
        backend,
        eval_tree_config(tree_cfg, k, sampling),
        sampling_cfg,
        eos_ids,
        decode,
        stats=stats,
        generator_id=-1,
        stop_strings=stop_strings,
        tools=tools,
    )
    eos = StopRule.of(eos_ids, stop_strings)
    items = [(p.row.id, p.prompt_ids, prompt_metadata(p.row)) for p in prompts]
    t0 = time.perf_counter()
    results: dict[str, ProblemResult] = {}
    for tree in sampler.run(items, max_in_flight):
        score_trees([tree], reward, decode, eos)
        correct = [bool(lf.correct) for lf in tree.leaves]
        answers = [lf.answer for lf in tree.leaves]
        results[tree.prompt_id] = ProblemResult(
            prompt_id=tree.prompt_id,
            answer=str(tree.metadata.get("answer", "")),
            answers=answers,
            correct=correct,
            majority=majority_vote(answers),
            mean_at_k=sum(correct) / len(correct),
            pass_at_k=pass_at_k(len(correct), sum(correct), k),
            maj_at_k=maj_at_k(answers, correct, k),
            texts=leaf_texts(tree, decode, eos) if keep_texts else [],
        )
        if progress:
            progress(1)
    wall = time.perf_counter() - t0
    ordered = [results[str(p.row.id)] for p in prompts]
    return EvalResult(
        ordered,
        k,
        sampling,
        wall,
        stats.decoded_tokens,
        stats.leaves,
        prefill_tokens_computed=stats.prefill_tokens_computed,
        trajectory_tokens=stats.leaf_tokens,
    )
