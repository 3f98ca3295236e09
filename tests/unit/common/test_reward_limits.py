"""Resource limits of answer extraction and reward workers (issue: a quadratic ``last_boxed`` in the
generator; verifier workers without a memory cap)."""

from __future__ import annotations

import time

from common.answers import last_boxed


def _reference(text: str) -> str | None:  # the rule, written the slow obvious way
    import re

    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                found = text[m.end() : i]
                break
            i += 1
    return found


def test_last_boxed_agrees_with_the_rule_on_tricky_texts():
    cases = [
        r"\boxed{2}", r"a \boxed{1} b \boxed{2", r"\boxed{\frac{1}{2}}", r"\fbox {x}", r"\boxed{a\}b}",
        r"\\boxed{3}", r"{ \boxed{4} }", r"\boxed{ { }", r"\boxed{5}\boxed{", "no box", r"\boxed{}",
        r"\boxed{\\}", r"x\boxed{a{b}c}\fbox{d}", "\\boxed{1}\\",
    ]  # fmt: skip
    for text in cases:
        assert last_boxed(text) == _reference(text), text


def test_last_boxed_is_linear_on_adversarial_text():
    """Unclosed boxes and open braces: the old per-box rescan took 0.77 s on 14 KB (quadratic); 1 MB
    would take about an hour. Linear, it is well under a second; the bound leaves a wide margin."""
    text = "\\boxed{" * 150_000  # ~1 MB, no box ever closes
    t0 = time.perf_counter()
    assert last_boxed(text) is None
    assert last_boxed(text + "}" * 3 + "\\boxed{7}") == "7"
    assert time.perf_counter() - t0 < 20


def _address_space_limit(pid: int) -> str:
    from pathlib import Path

    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if "address space" in ln)
    return line.split()[3]  # the soft limit in bytes


def test_reward_workers_and_their_memory_cap_come_from_the_config():
    from common.config import load_config
    from common.rewards import resolve_reward

    cfg = load_config(None, ["reward.workers=1", "reward.worker_memory_mb=1024"]).reward
    fn = resolve_reward("math", cfg=cfg)
    pool = fn.pool
    assert (pool.num_workers, pool.memory_mb) == (1, 1024)
    # a huge power fails inside the capped worker (scored wrong); the worker's limit is the config's
    assert fn.judge_many([("\\boxed{9^{9^{9^{9}}}}", "1")])[0].correct is False
    pool.warm_up()
    (worker,) = pool._all
    assert _address_space_limit(worker.proc.pid) == str(1024 << 20)
    pool.close()
