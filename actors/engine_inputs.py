"""Engine-side set-up, once for every entry point (the generator, the local driver, ``treepo sample``,
``treepo eval`` and the benchmarks): model → tokenizer → stop ids → prompts → rewards → backend →
sampler.

Rules kept here and nowhere else:

- The training reward is the configured one (``reward.*``) with the overlong penalty measured
  against ``tree.max_response_tokens``.
- The evaluation reward has NO overlong buffer: a held-out answer is right or wrong whatever its
  length (``reward.overlong_buffer`` is ignored), so numbers compare across length settings.
- The held-out set is ``data.eval``, cut to ``eval.max_problems`` (0 = all), and exists only when
  ``eval.every_steps`` is set.
- A response ends at its first stop token: an EOS id, or the chat template's end-of-turn token with
  ``data.template=chat`` (``generators.stop_token_ids`` replaces the derived ones;
  :func:`common.models.stop_token_ids`), or at its first stop string (``generators.stop``). The
  engine stops at a stop token, the sampler cuts at either (a stop string split across segments
  included) and the reward scores the text before it (:class:`common.stops.StopRule`).
- Every text is decoded without special tokens.
- The engine has room for the longest prompt it will see (:func:`actors.backends.backend_for_run`).
- With ``tools``, a segment also ends at a tool call (the format's closing string is one of the
  engine's stop strings) and every sampler of the process shares one tool runner
  (:class:`actors.tool_turns.ToolTurns`).

Rewards hold verifier subprocess pipes: build them in the process that scores (the generator actor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import TrainConfig


def prompt_metadata(row: Any, epoch: int | None = None) -> dict[str, Any]:
    """A tree's flat metadata: the gold answer, the epoch (when training) and the row's metadata (the
    scalars the wire format carries: str, int, float, bool, None; nested values such as verl's
    ``extra_info`` as one JSON string, :func:`common.data.wire_metadata`)."""
    from common.data import wire_metadata

    out: dict[str, Any] = {"answer": row.answer}
    if epoch is not None:
        out["epoch"] = int(epoch)
    out.update(wire_metadata(row.metadata))
    return out


def train_reward(cfg: TrainConfig, task: str | None, spec: str | None = None) -> Any:
    """The training reward for ``task`` (``spec`` overrides ``reward.fn``)."""
    from common.rewards import resolve_reward

    return resolve_reward(
        spec or cfg.reward.fn, task, cfg=cfg.reward, max_response_tokens=cfg.tree.max_response_tokens
    )


def eval_reward(cfg: TrainConfig, task: str | None) -> Any:
    """The evaluation reward for ``task``: the training reward without the overlong buffer."""
    from common.rewards import resolve_reward

    return resolve_reward(cfg.reward.fn, task, cfg=dataclasses.replace(cfg.reward, overlong_buffer=0))


@dataclass
class PromptSet:
    """Encoded prompts of one data file with the task they belong to and the reward that scores them."""

    spec: str
    path: Path
    task: str | None
    prompts: list = field(default_factory=list)  # common.data.EncodedPrompt
    reward: Any = None

    @property
    def longest(self) -> int:
        return max((len(p.prompt_ids) for p in self.prompts), default=0)


@dataclass
class EngineInputs:
    """A model's tokenizer, stop ids (EOS and end of turn) and stop strings, and the prompt sets and
    backend of a run's config."""

    cfg: TrainConfig | None
    model_path: str
    tokenizer: Any
    stop_ids: list[int]
    stop_strings: list[str] = field(default_factory=list)
    _tools: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, cfg: TrainConfig, model_path: str | None = None) -> EngineInputs:
        """For ``cfg`` (a :class:`common.config.TrainConfig`): ``model.path`` resolved (a ``tiny:`` model
        is built once and cached) unless ``model_path`` is given already resolved."""
        from common.models import resolve_model

        path = model_path or resolve_model(cfg.model)
        return cls.for_model(path, trust_remote_code=cfg.model.trust_remote_code, cfg=cfg)

    @classmethod
    def for_model(
        cls, model_path: str, *, trust_remote_code: bool = False, cfg: TrainConfig | None = None
    ) -> EngineInputs:
        """Without ``cfg`` the stop ids are the EOS ids only (no template, no override)."""
        from common.models import eos_token_ids, load_tokenizer, stop_token_ids

        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        stop = eos_token_ids(model_path)
        strings: list[str] = []
        if cfg is not None:
            stop = stop_token_ids(tokenizer, stop, cfg.data.template, list(cfg.generators.stop_token_ids))
            strings = list(cfg.generators.stop)
        return cls(cfg, str(model_path), tokenizer, stop, strings)

    @property
    def stop_set(self) -> Any:
        """The stop rule (:class:`common.stops.StopRule`: stop token ids and stop strings) that
        :func:`actors.scoring.score_trees` cuts the scored text with."""
        from common.stops import StopRule

        return StopRule.of(self.stop_ids, self.stop_strings)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ prompts
    def prompt_set(
        self,
        spec: str,
        split: str,
        *,
        reward: str | None = "train",
        first_rows: int = 0,
        max_problems: int = 0,
    ) -> PromptSet:
        """The prompts of ``spec`` (a file, a dataset directory, ``synthetic:<task>`` of ``split``, or a
        list of them: :func:`common.data.load_prompt_set`). ``reward``: "train",
        "eval" or None. ``first_rows``: only the file's first rows (before encoding); ``max_problems``:
        only the first encoded prompts."""
        from common.data import load_prompt_set

        encoded, path, task = load_prompt_set(
            spec, split, self.tokenizer, self.cfg.data, first_rows=first_rows
        )
        prompts = list(encoded)
        if max_problems:
            prompts = prompts[:max_problems]
        scorer = {"train": train_reward, "eval": eval_reward}[reward](self.cfg, task) if reward else None
        return PromptSet(spec, path, task, prompts, scorer)

    def training_set(self) -> PromptSet:
        """``data.train`` with the training reward."""
        return self.prompt_set(self.cfg.data.train, "train")

    def held_out_set(self) -> PromptSet | None:
        """``data.eval`` (``eval.max_problems`` of it) with the evaluation reward; None without
        ``eval.every_steps``."""
        if not self.cfg.eval.every_steps:
            return None
        return self.prompt_set(
            self.cfg.data.eval, "eval", reward="eval", max_problems=self.cfg.eval.max_problems
        )

    # ------------------------------------------------------------------ engine
    def open_backend(self, *sets: PromptSet | None, seed: int | None = None) -> Any:
        """The configured backend, with room for the longest prompt of ``sets``."""
        from actors.backends import backend_for_run

        longest = max((s.longest for s in sets if s is not None), default=0)
        return backend_for_run(self.cfg, self.model_path, self.stop_ids, longest, seed=seed)

    def sampler(self, backend: Any, **kw: Any) -> Any:
        """A :class:`actors.sampler.TreeSampler` on ``backend`` with the config's tree, sampling and tools."""
        from actors.sampler import TreeSampler

        kw.setdefault("stop_strings", self.stop_strings)
        kw.setdefault("tools", self.tool_turns)
        return TreeSampler(backend, self.cfg.tree, self.cfg.sampling, self.stop_ids, self.decode, **kw)

    @property
    def tool_turns(self) -> Any:
        """The config's tools (:class:`actors.tool_turns.ToolTurns`, built once), or None without."""
        if self._tools is None and self.cfg is not None and self.cfg.tools:
            from actors.tool_turns import ToolTurns

            self._tools = ToolTurns.from_config(self.cfg, self.tokenizer, self.decode)
        return self._tools
