"""Every Redis key of a training run, spelled in one place.

A run's keys live under ``treepo:<run name>:``; the run name is derived from the run directory's
absolute path (:func:`run_name_for`), so several runs share one Redis server and a resume must use the
same ``run_dir`` (an absolute path on clusters: ``ray job submit`` unpacks the working directory
somewhere new for every job).

- ``trees`` (stream), ``dead`` (dead-letter stream), ``dead_count`` (counter): the replay queue
  (:mod:`common.replay`).
- ``prompts:meta``, ``prompts:cursor``, ``prompts:retry``, ``prompts:generators``,
  ``prompts:inflight:<generator>``: prompt dispatch (:mod:`common.prompts`).
- ``prompts:reissued`` (queue entry id -> prompt position, until the entry is acknowledged) and
  ``pipeline:reissued_stale`` (counter): the prompts of trees dropped for staleness, re-issued once
  per entry (:meth:`common.prompts.PromptDispatcher.reissue`).
- ``pipeline:dropped``: the controller's count of discarded trees whose prompt is used up (dynamic
  sampling), the ``D`` of the admission rule (:mod:`common.schedule`).
- ``pipeline:version``: the highest policy version ever published, so a resumed run numbers its
  versions past every version a queued tree may carry.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import QueueError

PREFIX = "treepo"
TREES_PATTERN = f"{PREFIX}:*:trees"  # matches every run's tree stream (``SCAN MATCH``)


def run_name_for(run_dir: str | Path) -> str:
    """A key namespace unique to a run directory (shared Redis servers stay separate)."""
    path = Path(run_dir).resolve()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) or "run"
    return f"{safe}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


# attribute of RunKeys -> the key's name under ``treepo:<run>:``
_NAMES = {
    "trees": "trees",
    "dead": "dead",
    "dead_count": "dead_count",
    "prompts_meta": "prompts:meta",
    "prompts_cursor": "prompts:cursor",
    "prompts_retry": "prompts:retry",
    "prompts_generators": "prompts:generators",
    "prompts_reissued": "prompts:reissued",
    "reissued_stale": "pipeline:reissued_stale",
    "dropped": "pipeline:dropped",
    "version": "pipeline:version",
}


@dataclass(frozen=True)
class RunKeys:
    """The keys of run ``run``: one attribute per key of :data:`_NAMES`, plus
    :meth:`prompts_inflight` per generator."""

    run: str
    trees: str = field(init=False)
    dead: str = field(init=False)
    dead_count: str = field(init=False)
    prompts_meta: str = field(init=False)
    prompts_cursor: str = field(init=False)
    prompts_retry: str = field(init=False)
    prompts_generators: str = field(init=False)
    prompts_reissued: str = field(init=False)
    reissued_stale: str = field(init=False)
    dropped: str = field(init=False)
    version: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.run or any(c in self.run for c in " \n\t{}"):
            raise QueueError(f"run name {self.run!r} must be non-empty without spaces or braces")
        for attr, name in _NAMES.items():
            object.__setattr__(self, attr, f"{self.base}:{name}")

    @classmethod
    def of_trees_key(cls, key: str | bytes) -> RunKeys:
        """The run whose ``trees`` stream is ``key`` (as found with :data:`TREES_PATTERN`)."""
        k = key.decode() if isinstance(key, bytes) else key
        return cls(k[len(PREFIX) + 1 : -len(":trees")])

    @property
    def base(self) -> str:
        return f"{PREFIX}:{self.run}"

    def prompts_inflight(self, generator_id: int | str) -> str:
        return f"{self.base}:prompts:inflight:{generator_id}"
