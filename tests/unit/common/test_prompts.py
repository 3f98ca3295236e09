"""The prompt visiting order without Redis (the local driver's cursor), pure."""

from __future__ import annotations

from common.prompts import EpochCursor, epoch_permutation


def test_epoch_cursor_is_deterministic_and_resumable():
    a = EpochCursor(5, seed=3, epochs=2)
    seq = [a.next() for _ in range(10)]
    assert a.next() is None
    assert sorted(i for e, i in seq[:5]) == list(range(5)) and sorted(i for e, i in seq[5:]) == list(range(5))
    assert [e for e, _ in seq] == [0] * 5 + [1] * 5
    b = EpochCursor(5, seed=3, epochs=2)
    first = [b.next() for _ in range(3)]
    c = EpochCursor(5, seed=3, epochs=2, state=b.state())
    assert first + [c.next() for _ in range(7)] == seq


def test_epoch_cursor_follows_the_dispatchers_permutation():
    cursor = EpochCursor(7, seed=11, epochs=2)
    seq = [cursor.next() for _ in range(14)]
    assert [i for _, i in seq[:7]] == epoch_permutation(7, 11, 0).tolist()
    assert [i for _, i in seq[7:]] == epoch_permutation(7, 11, 1).tolist()
