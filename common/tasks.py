"""Synthetic verifiable tasks for CPU runs: seeded generators, held-out splits, exact answer checks.

The default task, ``arith``, is a short chain of additions and subtractions solved with a scratchpad, one
line per operation, ending in ``\\boxed{N}``::

    prompt:   "Compute 8+7-3+9.\\n"
    solution: "8+7=15\\n15-3=12\\n12+9=21\\nThe answer is \\boxed{21}"      (then EOS)

Each scratchpad line is a small reasoning step whose error ruins the answer, so a tree that branches
between lines has something to choose between. With character-level tokens (``common.tiny``) every
target response is 30-120 tokens, i.e. one to four 32-token segments. The difficulty (digits per
number, operations per problem) is one the default tiny model learns in a few minutes of CPU
warm-start (``common.tiny``: its build notes give the measured spread); 1-2 digit operands were
out of its reach. ``arith2`` (1-2 digit operands) is the harder variant for larger models.

``long`` is the long-reasoning variant, where decoding dominates a step's cost: 7-9 operations,
and a scratchpad that rewrites the remaining chain after every operation, so each line is computed
from the line above it (a local step a tiny model learns) and a solution is ~150-210 tokens::

    prompt:   "Compute 8+7-3+9.\n"
    solution: "8+7=15, 15-3+9\n15-3=12, 12+9\n12+9=21\nThe answer is \boxed{21}"

A wrong line carries its error to every later line, so the trees of a long scratchpad have
something to choose between at several depths.

``calc`` is the tool-use task: products of a 2-3 digit and a 2 digit number, beyond what a tiny model
computes by itself, within reach when it calls the calculator (the ``tiny`` tool-call format)::

    prompt:   "Compute 347*29.\n"
    solution: "[calc 347*29]=> 10063\nThe answer is \boxed{10063}"

``=> 10063\n`` is the tool's result: observation tokens, not the model's (``observation_spans``
finds them in a solution; the warm-start puts no loss on them). Part of the warm-start solutions
answer directly instead (``347*29=10063`` and the answer line: for the model, a guess), so RL has a
choice to learn: call the tool.

Splits are decided by a hash of the problem text, not by the seed: a problem is held out ("eval") for
every seed or for none, so no seed can leak a held-out problem into "train".

Pure Python: no torch, ray or vllm imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.answers import last_boxed
from common.errors import DataError

SPLITS = ("train", "eval")
# Share of all problems that belong to the held-out split (decided per problem by its hash).
EVAL_FRACTION = 0.1
ANSWER_PREFIX = "The answer is "
_INT = re.compile(r"\s*([+-]?[0-9]+)\s*")


@dataclass(frozen=True)
class ArithTask:
    """Chains of ``min_ops..max_ops`` additions/subtractions of ``min_digits..max_digits``-digit numbers.

    Every intermediate result stays >= 0 (a subtraction that would go negative becomes an addition),
    so the scratchpad never needs a minus sign in front of a number.
    """

    name: str = "arith"
    min_digits: int = 1
    max_digits: int = 1
    min_ops: int = 2
    max_ops: int = 3
    # "steps": one line per operation ("12+9=21"); "rewrite": each line also rewrites the rest of the
    # chain ("12+9=21, 21+4+2"), which makes solutions long and every step local.
    scratchpad: str = "steps"
    # Tokens a response may need (one per character in the tiny tokenizer), with room to spare.
    max_new_tokens: int = 128

    def problem(self, rng: random.Random) -> tuple[str, str, str]:
        """Draw one problem: (prompt, answer, solution)."""
        n_ops = rng.randint(self.min_ops, self.max_ops)
        numbers = [self._number(rng) for _ in range(n_ops + 1)]
        acc = numbers[0]
        expr = str(acc)
        steps = []
        for x in numbers[1:]:
            op = rng.choice("+-")
            if op == "-" and x > acc:
                op = "+"
            new = acc + x if op == "+" else acc - x
            steps.append((f"{acc}{op}{x}={new}", f"{op}{x}"))
            expr += f"{op}{x}"
            acc = new
        prompt = f"Compute {expr}.\n"
        solution = "".join(self._lines(steps)) + self.answer_line(str(acc))
        return prompt, str(acc), solution

    def _lines(self, steps: list[tuple[str, str]]) -> list[str]:
        """The scratchpad: one line per (operation, "op operand") step."""
        if self.scratchpad == "steps":
            return [f"{op}\n" for op, _ in steps]
        lines = []
        for i, (op, _) in enumerate(steps):
            rest = "".join(tail for _, tail in steps[i + 1 :])
            result = op.split("=")[1]
            lines.append(f"{op}, {result}{rest}\n" if rest else f"{op}\n")
        return lines

    @staticmethod
    def answer_line(answer: str, boxed: bool = True) -> str:
        """A solution's last line; ``boxed=False`` gives the bare number, which the reward scores as wrong."""
        return ANSWER_PREFIX + ("\\boxed{" + answer + "}" if boxed else answer)

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    @staticmethod
    def observation_spans(solution: str) -> list[tuple[int, int]]:
        return []  # no tool results

    def key(self) -> str:
        """The task's parameters, in cache file names (a change of difficulty never reuses a file)."""
        key = f"d{self.min_digits}-{self.max_digits}o{self.min_ops}-{self.max_ops}"
        return key if self.scratchpad == "steps" else f"{key}-{self.scratchpad}"

    def vocabulary(self) -> str:
        text = "0123456789+-=.\n " + "Compute" + ANSWER_PREFIX + "\\boxed{}"
        if self.scratchpad == "rewrite":
            text += ","  # only here: the alphabet of the other tasks (and so their models) stays as it was
        return "".join(sorted(set(text)))


@dataclass(frozen=True)
class CalcTask:
    """Products of a ``min_digits..max_digits``-digit and a ``factor_digits``-digit number, solved by
    calling the calculator (``tool_share`` of the warm-start solutions; the others answer directly)."""

    name: str = "calc"
    min_digits: int = 2
    max_digits: int = 3
    factor_digits: int = 2
    tool: str = "calc"  # the tool's name in a call: configure it as tools=[calc=calculator]
    tool_share: float = 0.3
    max_new_tokens: int = 64

    def problem(self, rng: random.Random) -> tuple[str, str, str]:
        a = rng.randint(10 ** (rng.randint(self.min_digits, self.max_digits) - 1), 10**self.max_digits - 1)
        b = rng.randint(10 ** (self.factor_digits - 1), 10**self.factor_digits - 1)
        return f"Compute {a}*{b}.\n", str(a * b), self.tool_solution(f"{a}*{b}", str(a * b))

    def tool_solution(self, expression: str, answer: str) -> str:
        """The solution that calls the tool (its result follows the call as the tool writes it)."""
        return f"[{self.tool} {expression}]=> {answer}\n" + ArithTask.answer_line(answer)

    def direct_solution(self, prompt: str, answer: str) -> str:
        """The solution that answers without the tool: the product written out, then the answer (the
        same copy of the expression as the call, so the warm-start teaches the copy from every row)."""
        expression = prompt.removeprefix("Compute ").rstrip().removesuffix(".")
        return f"{expression}={answer}\n" + ArithTask.answer_line(answer)

    @staticmethod
    def observation_spans(solution: str) -> list[tuple[int, int]]:
        """Character spans of the tool results in ``solution`` (``=> ...\n`` after a call)."""
        spans, at = [], solution.find("]=> ")
        while at >= 0:
            end = solution.find("\n", at)
            spans.append((at + 1, len(solution) if end < 0 else end + 1))
            at = solution.find("]=> ", at + 1)
        return spans

    @staticmethod
    def answer_line(answer: str, boxed: bool = True) -> str:
        return ArithTask.answer_line(answer, boxed)

    def key(self) -> str:
        return f"d{self.min_digits}-{self.max_digits}x{self.factor_digits}-{self.tool}"

    def vocabulary(self) -> str:
        text = "0123456789*.\n " + "Compute" + ANSWER_PREFIX + "\\boxed{}" + f"[{self.tool} ]=> "
        return "".join(sorted(set(text)))


Task = ArithTask | CalcTask

TASKS: dict[str, Task] = {
    "arith": ArithTask(),
    # Harder variant (1-2 digit operands) for larger models; same alphabet and answer check.
    "arith2": ArithTask(name="arith2", max_digits=2),
    # Long reasoning (~150-210 tokens per solution): decoding dominates a step's cost.
    "long": ArithTask(name="long", min_ops=7, max_ops=9, scratchpad="rewrite", max_new_tokens=256),
    # Tool use: products the tiny model cannot compute, but can hand to the calculator.
    "calc": CalcTask(),
}


def get_task(name: str) -> Task:
    """The task registered under ``name``; DataError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown synthetic task {name!r}: use one of {', '.join(sorted(TASKS))}") from None


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _problem_hash(task_name: str, prompt: str) -> str:
    return hashlib.sha256(f"{task_name}\0{prompt}".encode()).hexdigest()


def split_of(task: str | Task, prompt: str) -> str:
    """The split a problem belongs to, from its text alone (independent of any seed)."""
    h = _problem_hash(_task(task).name, prompt)
    return "eval" if int(h[:8], 16) < EVAL_FRACTION * 16**8 else "train"


def generate(task: str | Task, n: int, seed: int, split: str) -> list[dict]:
    """``n`` distinct problems of ``split`` ("train" | "eval"); the same (task, n, seed, split) gives the same rows.

    Rows are ``{"id", "prompt", "answer", "solution", "task"}``; ``id`` is derived from the problem
    text, so the same problem has the same id wherever it is generated.
    """
    t = _task(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if n < 0:
        raise DataError(f"n={n} must be >= 0")
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and runs.
    rng = random.Random(f"{t.name}:{seed}:{split}")
    rows: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise DataError(f"task {t.name!r} cannot produce {n} distinct {split} problems: ask for fewer")
        prompt, answer, solution = t.problem(rng)
        if prompt in seen or split_of(t, prompt) != split:
            continue
        seen.add(prompt)
        rows.append(
            {
                "id": f"{t.name}-{_problem_hash(t.name, prompt)[:16]}",
                "prompt": prompt,
                "answer": answer,
                "solution": solution,
                "task": t.name,
            }
        )
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines, atomically (a reader never sees a half-written file)."""
    path = Path(path)
    _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def treepo_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else $TREEPO_CACHE, else ~/.cache/treepo."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("TREEPO_CACHE") or "~/.cache/treepo").expanduser()


def synthetic_path(task: str, split: str, n: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Path of a JSONL file holding ``generate(task, n, seed, split)``, written once into the cache."""
    t = get_task(task)
    root = treepo_cache_dir(cache_dir)
    path = root / "data" / f"{t.name}-{split}-n{n}-seed{seed}-{t.key()}.jsonl"
    if not path.exists():
        write_jsonl(generate(t, n, seed, split), path)
    return path


def task_vocabulary(task: str) -> str:
    """Every character the task's prompts and solutions use, sorted (the character tokenizer's alphabet)."""
    return get_task(task).vocabulary()


def check_answer(task: str, response_text: str, answer: str) -> bool:
    """True iff the last ``\\boxed{}`` of the response holds exactly the integer ``answer``."""
    get_task(task)
    boxed = last_boxed(response_text)
    if boxed is None:
        return False
    # ASCII digits only: int() would also accept "1_000" or non-ASCII digits.
    got, want = _INT.fullmatch(boxed), _INT.fullmatch(str(answer))
    return got is not None and want is not None and int(got.group(1)) == int(want.group(1))
