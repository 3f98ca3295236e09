"""Rewards: the paper's boxed-answer math reward, the synthetic task's reward, user reward functions.

Rule (TreePO, following the authors' release): a leaf scores ``correct`` (+1) if the LAST complete
``\\boxed{...}`` (or ``\\fbox{...}``) in its response verifies against the ground truth with
math-verify, else ``wrong`` (-1); a response without a box is wrong. DAPO's overlong penalty is
added when ``overlong_buffer > 0``: beyond ``Lmax - buffer`` response tokens add
``-(len - (Lmax - buffer)) / buffer``, clipped at -1 (the full penalty at ``len >= Lmax``).

Deviations and decisions:

- The penalty is applied to every reward kind (math, arith, user functions): it is a property of the
  response length, configured once in ``reward.overlong_buffer``.
- A reward call can never hang or kill a worker. math-verify's own timeout uses ``signal.alarm``,
  which only works on the main thread (generators call rewards from Ray actor threads), so
  verification runs in a small pool of persistent subprocesses (``python -c``, JSON lines over
  pipes: no pickle, no ``multiprocessing`` re-import of ``__main__``, so it works the same in a
  Ray actor, a thread, or a plain script). A call past its deadline kills that worker (a fresh one
  is started on the next use) and scores ``wrong``; a crash scores ``wrong``. Both are counted in
  :class:`RewardStats`; neither is fatal.
- In-process fast paths, exact and cheap: no box -> wrong; the boxed text equals the gold text
  (whitespace and ``$`` ignored) -> correct; both are plain integers -> exact integer comparison
  (math-verify agrees on these, tested). Everything else goes to math-verify in a worker.
- The gold answer is parsed with LaTeX and expression extraction; a bare gold answer is wrapped in
  ``$...$``. If that yields nothing (e.g. ``\\$5``: a dollar sign inside the math delimiters), it
  is retried as ``\\boxed{gold}`` and then as given.
- math-verify behaviour we keep as is (tested): ``50\\%`` equals both ``50`` and ``0.5``; units in
  ``\\text{}`` are dropped (``5\\text{ cm}`` == ``5``); ``x=2`` equals ``2``; sets ignore order
  (``1,2`` == ``2,1``); decimals are compared after rounding to 6 places (``1/3`` == ``0.333333``
  but ``!= 0.33``); ``\\pi`` != ``3.14159``; ``1e3`` is NOT 1000 (parsed as ``1*e*3``).
- One final period inside the box is dropped (``\\boxed{5.}`` == 5; math-verify finds nothing in ``5.``).
- A truncated final box (``\\boxed{2`` at the end of a cut response) is not an answer: the last
  COMPLETE box wins.

The verdict: a leaf is CORRECT when its reward before the overlong penalty is above the midpoint of
``correct`` and ``wrong`` (:meth:`_Reward.judge_many`; for the built-in rewards the base reward is
exactly one of the two). It is judged before the penalty so that a long right answer stays right and
a long wrong one stays wrong: dynamic sampling and accuracies use the verdict, never the shaped value.

``auto`` picks the task's reward: the synthetic ``arith`` task's exact-integer check for rows whose
``metadata["task"] == "arith"`` (or when the task is known at start-up), math-verify otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from common.answers import last_boxed
from common.errors import RewardError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Pure helpers: boxed-answer extraction and the overlong penalty
# --------------------------------------------------------------------------------------------------


def overlong_penalty(response_len: int, max_response_tokens: int, overlong_buffer: int) -> float:
    """DAPO soft overlong penalty in [-1, 0]: ``-(len - (Lmax - buf)) / buf`` past ``Lmax - buf``."""
    if overlong_buffer <= 0:
        return 0.0
    start = max_response_tokens - overlong_buffer
    if response_len <= start:
        return 0.0
    return -min(1.0, (response_len - start) / overlong_buffer)


_WS = re.compile(r"\s+")
_PLAIN_INT = re.compile(r"[+-]?[0-9]+")


def _norm(s: str) -> str:
    return _WS.sub("", s).strip("$")


def _strip_period(pred: str) -> str:
    """``\\boxed{5.}`` means 5, but math-verify parses ``5.`` to nothing: drop one final period."""
    p = pred.rstrip()
    return p[:-1] if p.endswith(".") and not p.endswith("..") else pred


def _fast_math(pred: str, gold: str) -> bool | None:
    """Decide without math-verify when it is exact and obvious; None = ask math-verify."""
    p, g = _norm(pred), _norm(gold)
    if not p:
        return False
    if p == g:
        return True
    if _PLAIN_INT.fullmatch(p) and _PLAIN_INT.fullmatch(g):
        return int(p) == int(g)
    return None


# --------------------------------------------------------------------------------------------------
# math-verify, as run inside a worker (or in-process when isolation is off)
# --------------------------------------------------------------------------------------------------

_MV: dict[str, Any] = {}


def _math_verify_mod() -> dict[str, Any]:
    if not _MV:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        _MV.update(
            parse=parse,
            verify=verify,
            gold_cfg=[LatexExtractionConfig(), ExprExtractionConfig()],
            pred_cfg=[LatexExtractionConfig(boxed_match_priority=0)],
        )
        # math-verify warns once that its timeout is disabled: the deadline is ours (worker kill).
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    return _MV


def verify_boxed(pred: str, gold: str) -> bool:
    """math-verify a boxed answer's content against the gold answer (no timeout: run it isolated)."""
    mv = _math_verify_mod()
    parse, verify = mv["parse"], mv["verify"]
    gold = gold.strip()
    candidates = [gold] if ("$" in gold or "\\boxed" in gold) else [f"${gold}$"]
    candidates += [f"\\boxed{{{gold}}}", gold]
    gold_parsed: list = []
    for cand in candidates:
        gold_parsed = parse(cand, extraction_config=mv["gold_cfg"], parsing_timeout=None)
        if gold_parsed:
            break
    if not gold_parsed:
        return False
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=mv["pred_cfg"], parsing_timeout=None)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --------------------------------------------------------------------------------------------------
# User reward functions by dotted path
# --------------------------------------------------------------------------------------------------


def load_user_fn(spec: str) -> Callable:
    """Import ``package.module:function`` or ``file.py:function`` and check that its parameters are one
    of the reward forms (:mod:`common.user_rewards`: treepo, verl, batched)."""
    from common.user_rewards import import_callable, reward_kind

    fn = import_callable(spec)
    reward_kind(fn, spec)
    return fn


# --------------------------------------------------------------------------------------------------
# Worker process: JSON lines over pipes
# --------------------------------------------------------------------------------------------------


def _handle(req: dict, user_fns: dict[str, Callable]) -> Any:
    op = req["op"]
    if op == "math":
        return verify_boxed(req["pred"], req["gold"])
    if op in ("user", "user_batch"):  # the caller's import path travels with the request
        from common.user_rewards import handle_request

        return handle_request(req, user_fns)
    if op == "ping":
        return True
    raise ValueError(f"unknown op {op!r}")


def _worker_main() -> None:
    """Entry point of a verifier subprocess. Protocol: one JSON request per line in, one reply out."""
    # Keep the protocol on private copies of stdin/stdout: anything user code prints goes to stderr,
    # and nothing it reads can steal a request.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cap_mb = int(os.environ.get(MEMORY_ENV, "0") or 0)
    if cap_mb > 0:  # a runaway answer (\\boxed{9^{9^{9^{9}}}}) fails with MemoryError, not the node's RAM
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
    parent = os.getppid()

    def watchdog() -> None:  # a worker stuck in a loop must not outlive a killed parent
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    _math_verify_mod()  # import sympy once, before "ready", so no call's deadline pays for it
    user_fns: dict[str, Callable] = {}
    proto_out.write(b'{"ready": true}\n')
    for line in proto_in:
        try:
            reply = {"ok": True, "value": _handle(json.loads(line), user_fns)}
        except BaseException as e:  # noqa: BLE001 - any failure of user code is a scored error
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        proto_out.write(json.dumps(reply).encode() + b"\n")


_BOOT = "from common.rewards import _worker_main; _worker_main()"
MEMORY_ENV = "TREEPO_REWARD_WORKER_MEMORY_MB"
DEFAULT_WORKER_MEMORY_MB = 2048  # address space per verifier worker (sympy + math-verify need ~0.5 GB)


class _Timeout(Exception):
    pass


class _Crash(Exception):
    pass


class _Worker:
    """One verifier subprocess owned by this process (stopped by pid, never by name)."""

    def __init__(self, start_timeout_s: float, memory_mb: int = DEFAULT_WORKER_MEMORY_MB) -> None:
        paths = [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
        env[MEMORY_ENV] = str(int(memory_mb))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            # own session: a Ctrl-C to the terminal's process group must not kill workers mid-call;
            # the parent closes them at exit and a watchdog ends them if the parent is killed
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        try:
            reply = self._read(time.monotonic() + start_timeout_s)
        except (_Timeout, _Crash) as e:
            self.kill()
            raise RewardError(
                f"reward worker did not start within {start_timeout_s:.0f} s ({type(e).__name__.strip('_')}): "
                f"check that `{sys.executable} -c 'import common.rewards, math_verify'` works"
            ) from None
        if not reply.get("ready"):
            self.kill()
            raise RewardError(f"reward worker sent {reply!r} instead of ready")

    def _read(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            # poll, not select: a Ray worker can hold more than 1024 descriptors
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(1, math.ceil(left * 1000))):
                raise _Timeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Crash(f"worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def request(self, req: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req, default=str).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            raise _Crash(f"worker pipe closed ({e})") from None
        return self._read(time.monotonic() + timeout_s)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("reward worker pid %d did not exit after SIGKILL", self.proc.pid)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()  # type: ignore[union-attr]


class Outcome(NamedTuple):
    """Result of one isolated call: ``status`` is ok | timeout | error; ``value`` is set when ok."""

    status: str
    value: Any = None
    detail: str = ""


class VerifierPool:
    """A fixed number of persistent verifier subprocesses, started lazily and replaced after a kill.

    Thread-safe: each call takes an idle worker (waiting if all are busy). The deadline covers the
    evaluation only, not the wait for a worker nor a worker's start-up.
    """

    def __init__(
        self, num_workers: int = 2, start_timeout_s: float = 60.0, memory_mb: int = DEFAULT_WORKER_MEMORY_MB
    ) -> None:
        if num_workers < 1:
            raise RewardError(f"reward pool size {num_workers} < 1: use at least one worker")
        self.num_workers = num_workers
        self.memory_mb = int(memory_mb)  # each worker's address-space cap (0 = none)
        self.start_timeout_s = start_timeout_s
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(num_workers):
            self._idle.put(None)
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self.owner_pid = os.getpid()

    def _start(self) -> _Worker:
        w = _Worker(self.start_timeout_s, self.memory_mb)
        with self._lock:
            self._all.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)

    def warm_up(self) -> None:
        """Start every worker now (start-up takes about a second each: sympy's import)."""
        workers = [self._idle.get() for _ in range(self.num_workers)]
        try:
            for i, w in enumerate(workers):
                if w is None or not w.alive():
                    workers[i] = self._start()
        finally:
            for w in workers:
                self._idle.put(w)

    def call(self, req: dict, timeout_s: float) -> Outcome:
        if self._closed:
            raise RewardError("reward pool is closed")
        w = self._idle.get()
        try:
            if w is None or not w.alive():
                if w is not None:
                    self._retire(w)
                w = None
                w = self._start()
            try:
                reply = w.request(req, timeout_s)
            except _Timeout:
                self._retire(w)
                w = None
                return Outcome("timeout", detail=f"no reply within {timeout_s} s")
            except _Crash as e:
                self._retire(w)
                w = None
                return Outcome("error", detail=str(e))
            if reply.get("ok"):
                return Outcome("ok", reply.get("value"))
            return Outcome("error", detail=str(reply.get("error")))
        finally:
            self._idle.put(w)

    def map(self, reqs: Sequence[dict], timeout_s: float) -> list[Outcome]:
        """Run requests concurrently on the pool's workers, each with its own deadline."""
        if len(reqs) <= 1:
            return [self.call(r, timeout_s) for r in reqs]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="reward")
            ex = self._executor
        return list(ex.map(lambda r: self.call(r, timeout_s), reqs))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), []
            ex, self._executor = self._executor, None
        for w in workers:
            w.kill()
        if ex is not None:
            ex.shutdown(wait=False)


_SHARED: dict[tuple[int, int], VerifierPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(num_workers: int | None = None, memory_mb: int | None = None) -> VerifierPool:
    """This process's verifier pool of ``num_workers`` workers (``reward.workers``; default up to 4)
    capped at ``memory_mb`` each; re-created after a fork (pipes cannot be shared)."""
    n = num_workers or max(1, min(4, (os.cpu_count() or 2)))
    mem = DEFAULT_WORKER_MEMORY_MB if memory_mb is None else int(memory_mb)
    with _SHARED_LOCK:
        pool = _SHARED.get((n, mem))
        if pool is None or pool.owner_pid != os.getpid() or pool._closed:
            pool = _SHARED[(n, mem)] = VerifierPool(n, memory_mb=mem)
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in list(_SHARED.values()):
        if pool.owner_pid == os.getpid():
            pool.close()


# --------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardStats:
    """Counters of one reward function (thread-safe). ``in_process``: calls decided without a worker."""

    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    in_process: int = 0
    seconds: float = 0.0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **inc: Any) -> None:
        with self._lock:
            for k, v in inc.items():
                if k == "last_error":
                    self.last_error = v
                else:
                    setattr(self, k, getattr(self, k) + v)

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. returned from a Ray actor): drop the lock
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        with self._lock:
            return {
                f"{prefix}calls": self.calls,
                f"{prefix}timeouts": self.timeouts,
                f"{prefix}errors": self.errors,
                f"{prefix}in_process": self.in_process,
                f"{prefix}seconds": self.seconds,
            }


class Scored(NamedTuple):
    """One scored response: the reward (penalty included) and the verdict (judged before the penalty)."""

    reward: float
    correct: bool


class RewardItem(NamedTuple):
    """One response to score (a plain 4-tuple works too)."""

    response_text: str
    answer: str
    metadata: dict | None = None
    response_len: int = 0
    prompt: str = ""  # filled for rewards with ``wants_prompts`` (batched user functions, reward servers)


@runtime_checkable
class RewardFn(Protocol):
    """What generators call: ``fn(text, answer, metadata, response_len)`` or ``fn.score_many(items)``."""

    name: str
    stats: RewardStats

    def __call__(
        self, response_text: str, answer: str, metadata: dict | None = None, response_len: int = 0
    ) -> float: ...

    def score_many(self, items: Iterable[RewardItem | tuple]) -> list[float]: ...

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]: ...


class _Job(NamedTuple):
    req: dict


class _Reward:
    """Shared machinery: in-process decisions, isolated jobs, counting, the overlong penalty."""

    name = "reward"

    def __init__(
        self,
        *,
        correct: float = 1.0,
        wrong: float = -1.0,
        timeout_s: float = 5.0,
        overlong_buffer: int = 0,
        max_response_tokens: int | None = None,
        pool: VerifierPool | None = None,
    ) -> None:
        if overlong_buffer > 0 and not max_response_tokens:
            raise RewardError(
                f"reward.overlong_buffer={overlong_buffer} needs the maximum response length: pass "
                "max_response_tokens (tree.max_response_tokens) or set reward.overlong_buffer=0"
            )
        if max_response_tokens and overlong_buffer > max_response_tokens:
            raise RewardError(
                f"reward.overlong_buffer={overlong_buffer} > max_response_tokens={max_response_tokens}: lower it"
            )
        self.correct, self.wrong, self.timeout_s = float(correct), float(wrong), float(timeout_s)
        self.overlong_buffer, self.max_response_tokens = int(overlong_buffer), int(max_response_tokens or 0)
        self._pool = pool
        self.stats = RewardStats()

    @property
    def pool(self) -> VerifierPool:
        if self._pool is None or self._pool.owner_pid != os.getpid():
            old = self._pool
            self._pool = shared_pool(old and old.num_workers, old and old.memory_mb)
        return self._pool

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | _Job:
        """The base score now, or a _Job for a verifier worker (its value then goes through _finish).
        Rewards that score whole batches override ``judge_many`` instead and never reach this."""
        raise TypeError(f"{type(self).__name__} scores whole batches through judge_many, not one item")

    def _finish(self, value: Any) -> float:
        return self.correct if value else self.wrong

    def _shape(self, base: float, response_len: int) -> float:
        if self.overlong_buffer <= 0:
            return base
        return base + overlong_penalty(response_len, self.max_response_tokens, self.overlong_buffer)

    def _resolve(self, outcome: Outcome) -> float:
        if outcome.status == "ok":
            try:
                return self._finish(outcome.value)
            except (TypeError, ValueError) as e:
                outcome = Outcome("error", detail=str(e))
        if outcome.status == "timeout":
            self.stats.add(timeouts=1)
        else:
            self.stats.add(errors=1, last_error=outcome.detail)
            log.warning("reward %s failed: %s (scored as wrong)", self.name, outcome.detail)
        return self.wrong

    def _prepare_counted(self, text: str, answer: str, metadata: dict) -> float | _Job:
        try:
            return self._prepare(text, answer, metadata)
        except Exception as e:  # an in-process check that fails scores wrong, counted, like a worker crash
            self.stats.add(errors=1, last_error=f"{type(e).__name__}: {e}")
            log.warning("reward %s failed in-process: %s (scored as wrong)", self.name, e)
            return self.wrong

    def __call__(
        self, response_text: str, answer: str, metadata: dict | None = None, response_len: int = 0
    ) -> float:
        return self.score_many([(response_text, answer, metadata, response_len)])[0]

    def score_many(self, items: Iterable[RewardItem | tuple]) -> list[float]:
        return [s.reward for s in self.judge_many(items)]

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]:
        """Reward and verdict of every item (one batch: verifier calls run in parallel)."""
        t0 = time.perf_counter()
        items = [RewardItem(*it) for it in items]
        base_I: list[float | None] = [None] * len(items)
        jobs: list[tuple[int, dict]] = []
        for i, it in enumerate(items):
            r = self._prepare_counted(str(it.response_text), str(it.answer), dict(it.metadata or {}))
            if isinstance(r, _Job):
                jobs.append((i, r.req))
            else:
                base_I[i] = r
        if jobs:
            outcomes = self.pool.map([req for _, req in jobs], self.timeout_s)
            for (i, _), out in zip(jobs, outcomes):
                base_I[i] = self._resolve(out)
        self.stats.add(calls=len(items), in_process=len(items) - len(jobs), seconds=time.perf_counter() - t0)
        midpoint = (self.correct + self.wrong) / 2
        return [
            Scored(self._shape(b, it.response_len), b > midpoint)  # type: ignore[arg-type,operator]
            for b, it in zip(base_I, items)
        ]


class MathReward(_Reward):
    """Last boxed answer, verified with math-verify (in a worker unless a fast path decides).

    ``isolate=False`` runs math-verify in the calling thread with NO timeout: only for trusted
    inputs (benchmarks, tests); rollouts from a policy can make sympy spin.
    """

    name = "math"

    def __init__(self, *, isolate: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.isolate = isolate

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | _Job:
        pred = last_boxed(text)
        if pred is None:
            return self.wrong
        pred = _strip_period(pred)
        fast = _fast_math(pred, answer)
        if fast is not None:
            return self.correct if fast else self.wrong
        if not self.isolate:
            return self.correct if verify_boxed(pred, answer) else self.wrong
        return _Job({"op": "math", "pred": pred, "gold": answer})


class ArithReward(_Reward):
    """The synthetic arith task: exact integer match of the last box (``common.tasks.check_answer``)."""

    name = "arith"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        try:
            from common.tasks import check_answer
        except ImportError as e:
            raise RewardError(f"reward 'arith' needs common.tasks ({e}): install the package fully") from None
        self._check = check_answer

    def _prepare(self, text: str, answer: str, metadata: dict) -> float:
        # Our own regex + int comparison: bounded and safe in-process.
        return self.correct if self._check("arith", text, answer) else self.wrong


class UserReward(_Reward):
    """A ``package.module:function`` reward, always run in a worker with a deadline."""

    def __init__(self, spec: str, **kw: Any) -> None:
        from common.user_rewards import absolute_spec

        super().__init__(**kw)
        spec = absolute_spec(spec)  # a file.py path: the same file in every worker
        self.fn = load_user_fn(spec)  # fail at start-up, in this process, with a clear message
        self.spec = self.name = spec

    def _prepare(self, text: str, answer: str, metadata: dict) -> _Job:
        req = {"op": "user", "fn": self.spec, "response": text, "answer": answer, "metadata": metadata}
        req["paths"] = [p or os.getcwd() for p in sys.path]
        return _Job(req)

    def _finish(self, value: Any) -> float:
        from common.user_rewards import reward_value

        return reward_value(value)


class AutoReward(_Reward):
    """Per row: the arith reward when ``metadata["task"] == "arith"``, the math reward otherwise."""

    name = "auto"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.math = MathReward(**kw)
        self._arith: ArithReward | None = None
        self._kw = kw

    def _sub(self, metadata: dict) -> _Reward:
        if metadata.get("task") == "arith":
            if self._arith is None:
                self._arith = ArithReward(**self._kw)
            return self._arith
        return self.math

    def _prepare(self, text: str, answer: str, metadata: dict) -> float | _Job:
        return self._sub(metadata)._prepare(text, answer, metadata)


def resolve_reward(
    spec: str = "auto",
    task: str | None = None,
    *,
    cfg: Any = None,
    max_response_tokens: int | None = None,
    pool: VerifierPool | None = None,
) -> RewardFn:
    """Build the reward named by ``reward.fn``, checked at start-up (RewardError names the fix).

    ``spec``: auto | math | arith | package.module:function. ``task``: the synthetic task the data
    comes from (``"arith"``), ``"math"``, or None (unknown: ``auto`` then decides per row from
    ``metadata["task"]``). ``cfg``: a :class:`common.config.RewardConfig` (timeout_s, correct,
    wrong, overlong_buffer); ``max_response_tokens`` is needed when ``overlong_buffer > 0``.
    """
    kw: dict[str, Any] = {"max_response_tokens": max_response_tokens, "pool": pool}
    if cfg is not None:
        kw.update(
            correct=cfg.correct, wrong=cfg.wrong, timeout_s=cfg.timeout_s, overlong_buffer=cfg.overlong_buffer
        )
        if pool is None:  # reward.workers verifier subprocesses, each capped at reward.worker_memory_mb
            kw["pool"] = shared_pool(cfg.workers, getattr(cfg, "worker_memory_mb", None))
    url = getattr(cfg, "url", "") if cfg is not None else ""
    if url:  # a reward server (common.user_rewards); config validation refuses it beside a reward.fn
        from common.user_rewards import HttpReward

        return HttpReward(url, retries=getattr(cfg, "retries", 3), **kw)
    if spec == "auto":
        if task is None:
            return AutoReward(**kw)
        spec = task
    if spec == "math":
        return MathReward(**kw)
    if spec == "arith":
        return ArithReward(**kw)
    if ":" in spec:  # package.module:function or file.py:function, in any of the three forms
        from common.user_rewards import user_reward

        return user_reward(spec, **kw)
    raise RewardError(
        f"reward {spec!r} is unknown: use auto, math, arith or a 'package.module:function' path"
        + (f" (task {task!r} has no built-in reward)" if task else "")
    )


def math_reward(
    response_text: str,
    answer: str,
    *,
    response_len: int = 0,
    max_response_tokens: int = 0,
    overlong_buffer: int = 0,
    correct: float = 1.0,
    wrong: float = -1.0,
    timeout_s: float = 5.0,
) -> float:
    """The paper's reward for one response (uses this process's shared verifier pool)."""
    fn = MathReward(
        correct=correct,
        wrong=wrong,
        timeout_s=timeout_s,
        overlong_buffer=overlong_buffer,
        max_response_tokens=max_response_tokens or None,
    )
    return fn(response_text, answer, None, response_len)


__all__ = [
    "ArithReward",
    "AutoReward",
    "MathReward",
    "Outcome",
    "RewardFn",
    "RewardItem",
    "RewardStats",
    "Scored",
    "UserReward",
    "VerifierPool",
    "last_boxed",
    "load_user_fn",
    "math_reward",
    "overlong_penalty",
    "resolve_reward",
    "shared_pool",
    "verify_boxed",
]
