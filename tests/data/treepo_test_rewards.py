"""User reward functions for tests/unit/common/test_rewards.py (imported by dotted path in reward workers)."""

from __future__ import annotations

import os
import time


def length_bonus(response_text: str, answer: str, metadata: dict) -> float:
    return 0.5 if answer in response_text else float(metadata.get("miss", -0.5))


def sleeps_forever(response_text: str, answer: str, metadata: dict) -> float:
    while True:
        time.sleep(60)


def raises(response_text: str, answer: str, metadata: dict) -> float:
    raise ZeroDivisionError("user code failed")


def exits(response_text: str, answer: str, metadata: dict) -> float:
    os._exit(3)  # the worker process dies mid-call


def returns_text(response_text: str, answer: str, metadata: dict) -> float:
    return "1.0"  # type: ignore[return-value]


def prints_noise(response_text: str, answer: str, metadata: dict) -> float:
    print("noise on stdout must not break the worker protocol")
    return 1.0


def two_args(response_text: str, answer: str) -> float:
    return 0.0


NOT_CALLABLE = 3
