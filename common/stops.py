"""The stop rule: where a response ends, the same in training, ``treepo sample`` and ``treepo eval``.

A response ends at its first stop: a stop token (an EOS id, the chat template's end of turn or
``generators.stop_token_ids``: :func:`common.models.stop_token_ids`) or a stop string
(``generators.stop``). The sampler keeps the tokens up to and including the one that ends it (the
stop token itself, or the token that completes a stop string) and stops growing that path; the reward
scores the text before the stop (a stop token's text and a stop string are excluded).

A stop string may be split across tokens and across TreePO segments: the sampler looks for it in the
decoded text of the new segment together with the tail of the path before it
(:meth:`StopRule.string_end`), so ``"###"`` written as ``"##"`` at the end of one segment and ``"#"`` at
the start of the next ends the path at that ``"#"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

DecodeFn = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class StopRule:
    """Stop token ids and stop strings."""

    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()

    @classmethod
    def of(cls, stop: StopRule | Iterable[int] | None, strings: Iterable[str] = ()) -> StopRule:
        """A rule from a rule (returned as is, ``strings`` added) or from token ids."""
        if isinstance(stop, StopRule):
            return cls(stop.ids, tuple(dict.fromkeys([*stop.strings, *strings]))) if strings else stop
        return cls(frozenset(int(i) for i in (stop or ())), tuple(dict.fromkeys(strings)))

    def __post_init__(self) -> None:
        if any(not s for s in self.strings):
            raise ValueError("a stop string is empty: drop it from generators.stop")

    @property
    def context_tokens(self) -> int:
        """Tokens of a path's tail that can hold the beginning of a stop string completed by the next
        token: at most 4 bytes per character (a byte-level tokenizer can split every character)."""
        return 4 * max((len(s) for s in self.strings), default=0)

    def first_token(self, ids: Sequence[int]) -> int | None:
        """Index of the first stop token in ``ids``, or None."""
        return next((i for i, t in enumerate(ids) if t in self.ids), None)

    def text_cut(self, text: str) -> int | None:
        """Where the first stop string begins in ``text``, or None."""
        found = [at for at in (text.find(s) for s in self.strings) if at >= 0]
        return min(found) if found else None

    def cut_text(self, text: str) -> str:
        """``text`` before its first stop string."""
        at = self.text_cut(text)
        return text if at is None else text[:at]

    def _ends_after(self, text: str, start: int) -> bool:
        """A stop string in ``text`` that ends after character ``start``."""
        return any(s in text[max(0, start - len(s) + 1) :] for s in self.strings)

    def string_end(self, context: Sequence[int], new: Sequence[int], decode: DecodeFn) -> int | None:
        """Index in ``new`` of the token that completes the first stop string of the text of
        ``context + new`` (``context``: the path's tail before ``new``, :attr:`context_tokens` of it is
        enough), or None. One decode when there is none; a binary search over ``new`` otherwise."""
        if not self.strings or not new:
            return None
        ctx = list(context)
        head = decode(ctx) if ctx else ""
        # a context that ends inside a character (a split UTF-8 sequence decodes as U+FFFD) has that
        # character completed by the next bytes: a stop may end there
        start = len(head) - 1 if head.endswith("\ufffd") else len(head)
        new = list(new)
        if not self._ends_after(decode(ctx + new), start):
            return None
        lo, hi = 1, len(new)  # the smallest k with a stop in decode(ctx + new[:k])
        while lo < hi:
            mid = (lo + hi) // 2
            if self._ends_after(decode(ctx + new[:mid]), start):
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def response_text(self, ids: Sequence[int], decode: DecodeFn) -> str:
        """The text a reward scores: ``ids`` up to (not including) the first stop token, decoded, cut
        before the first stop string."""
        ids = list(ids)
        cut = self.first_token(ids)
        return self.cut_text(decode(ids if cut is None else ids[:cut]))
