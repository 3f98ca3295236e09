"""User reward functions: finding one and calling it, in any of three shapes (the rewards built on
them are in :mod:`common.rewards.user`; this module is also what a verifier worker runs).

``reward.fn`` names a function as ``package.module:function`` or ``path/to/file.py:function`` (a
relative path is taken from the working directory of the process that builds the reward). Its shape
is detected from its parameter names, never guessed from its name:

- **treepo**: ``fn(response_text, answer, metadata) -> float`` (any names; three positional args).
- **verl**: ``compute_score(data_source, solution_str, ground_truth, extra_info)`` (detected by a
  ``solution_str`` parameter), called with the row's ``data_source`` and ``extra_info`` (verl-layout
  data keeps both, :mod:`common.data`); parameters it does not declare are not passed.
- **batched**: ``fn(data_sources, solution_strs, ground_truths, extra_infos, prompts)`` (detected by a
  ``solution_strs`` parameter: verl's batch naming) returning one value per
  response; ``prompts`` (the rendered prompt texts, special tokens dropped) is passed when declared.
  One call per batch of responses, under one ``reward.timeout_s`` deadline.

A value is a finite number (bool counts as 0/1), or a dict with a ``score`` (verl's richer return).
Functions run in the verifier subprocesses of :mod:`common.rewards.pool` (a hang or crash scores
wrong and is counted). The verdict is the usual one: above the midpoint of ``reward.correct`` and
``reward.wrong`` (a 0/1 function wants ``reward.wrong=0``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.data import full_metadata
from common.errors import RewardError

KINDS = ("treepo", "verl", "batched")
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
BATCH_ARGS = ("data_sources", "solution_strs", "ground_truths", "extra_infos", "prompts")
_FORMS = (
    "fn(response_text, answer, metadata), verl's compute_score(data_source, solution_str, ground_truth, "
    "extra_info), or the batched fn(data_sources, solution_strs, ground_truths, extra_infos[, prompts])"
)


# --------------------------------------------------------------------------------------------------
# Finding and calling a user function
# --------------------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise RewardError(
            f"reward function {spec!r} is not 'package.module:function' or 'file.py:function': write e.g. "
            "reward.fn=mypkg.rewards:score or reward.fn=rewards.py:compute_score"
        )
    return mod_name, fn_name


def absolute_spec(spec: str) -> str:
    """``file.py:fn`` with the file's absolute path (so worker processes find the same file)."""
    mod_name, fn_name = _split_spec(spec)
    if mod_name.endswith(".py"):
        return f"{Path(mod_name).expanduser().resolve()}:{fn_name}"
    return spec


def _import_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file {path} does not exist; fix the path in reward.fn")
    name = "treepo_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
    try:
        loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # the user's module failed at import: name the file and the cause
        raise RewardError(
            f"reward function {spec!r}: importing {path} failed ({type(e).__name__}: {e})"
        ) from None
    sys.modules[name] = module
    return module


def import_callable(spec: str) -> Callable:
    """The function named by ``package.module:function`` or ``file.py:function``."""
    mod_name, fn_name = _split_spec(spec)
    if mod_name.endswith(".py"):
        module = _import_file(mod_name, spec)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise RewardError(
                f"reward function {spec!r}: cannot import module {mod_name!r} ({e}); check the name and that "
                "it is on PYTHONPATH (or shipped with the job's working directory), or give a file.py path"
            ) from None
    fn = module
    for part in fn_name.split("."):
        if not hasattr(fn, part):
            raise RewardError(
                f"reward function {spec!r}: module {mod_name!r} has no attribute {fn_name!r}; fix the name"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(
            f"reward function {spec!r} is a {type(fn).__name__}, not a function: point at a callable"
        )
    return fn


def reward_kind(fn: Callable, spec: str = "") -> str:
    """``treepo``, ``verl`` or ``batched`` from the parameter names (RewardError when none fits)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "treepo"  # builtins without a signature: cannot check, trust the call
    if "solution_strs" in params:
        return "batched"
    if "solution_str" in params:
        return "verl"
    try:
        inspect.signature(fn).bind("response", "answer", {})
    except TypeError:
        raise RewardError(
            f"reward function {spec!r} has signature {inspect.signature(fn)}, which is none of the reward "
            f"forms: {_FORMS}; change its parameters"
        ) from None
    return "treepo"


def _kwargs_for(fn: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``values`` that ``fn`` declares (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params}


def reward_value(value: Any) -> float:
    """A user function's return as a float: a finite number, a bool, or a dict with a ``score``."""
    if isinstance(value, dict) and "score" in value:
        value = value["score"]
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(
            f"reward function returned {value!r:.80}; it must return a finite float (or {{'score': x}})"
        )
    return float(value)


def call_one(fn: Callable, kind: str, response: str, answer: str, metadata: dict) -> float:
    """One response through a ``treepo`` or ``verl`` function (in a verifier worker)."""
    if kind == "verl":
        values = {
            "data_source": metadata.get("data_source"),
            "solution_str": response,
            "ground_truth": answer,
            "extra_info": metadata.get("extra_info"),
        }
        return reward_value(fn(**_kwargs_for(fn, values)))
    return reward_value(fn(response, answer, metadata))


def call_batch(fn: Callable, items: Sequence[dict]) -> list[float]:
    """A batch of responses through a ``batched`` function (in a verifier worker)."""
    values = {
        "data_sources": [it["metadata"].get("data_source") for it in items],
        "solution_strs": [it["response"] for it in items],
        "ground_truths": [it["answer"] for it in items],
        "extra_infos": [it["metadata"].get("extra_info") for it in items],
        "prompts": [it["prompt"] for it in items],
    }
    out = fn(**_kwargs_for(fn, values))
    if not isinstance(out, (list, tuple)) or len(out) != len(items):
        raise TypeError(
            f"batched reward function returned {type(out).__name__} of length "
            f"{len(out) if hasattr(out, '__len__') else '?'} for {len(items)} responses; return one value per response"
        )
    return [reward_value(v) for v in out]


def handle_request(req: dict, cache: dict[str, tuple[Callable, str]]) -> Any:
    """A worker's answer to a ``user`` or ``user_batch`` request (functions cached per spec)."""
    spec = req["fn"]
    if spec not in cache:
        sys.path.extend(p for p in req.get("paths", ()) if p not in sys.path)
        fn = import_callable(spec)
        cache[spec] = (fn, reward_kind(fn, spec))
    fn, kind = cache[spec]
    if req["op"] == "user_batch":
        return call_batch(fn, req["items"])
    return call_one(fn, kind, req["response"], req["answer"], full_metadata(req["metadata"]))


def load_user_fn(spec: str) -> Callable:
    """Import ``package.module:function`` or ``file.py:function`` and check that its parameters are one
    of the reward forms (treepo, verl, batched)."""
    fn = import_callable(spec)
    reward_kind(fn, spec)
    return fn


__all__ = [
    "BATCH_ARGS",
    "KINDS",
    "VERL_ARGS",
    "absolute_spec",
    "call_batch",
    "call_one",
    "handle_request",
    "import_callable",
    "load_user_fn",
    "reward_kind",
    "reward_value",
]
