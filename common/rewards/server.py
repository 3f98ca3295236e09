"""A reward server: ``reward.url`` sends every batch to an HTTP server instead of scoring it here:
``POST url`` with ``{"items": [{"prompt", "response", "answer", "metadata"}, ...]}``, answered by
``{"rewards": [value, ...]}`` (same order and length). Each try has ``reward.timeout_s``; connection
errors, timeouts, HTTP 429 and 5xx are retried ``reward.retries`` times with doubling back-off
(0.5 s, 1 s, 2 s, ...); after the last, or on any other HTTP error or a malformed answer, a
:class:`RewardError` names the server, what failed and the fix (a reward that silently scored
everything wrong would train on noise). The server is probed (a TCP connect) when the reward is
built, so a server that is down stops the run at start-up.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from common.errors import RewardError
from common.rewards.base import Reward, RewardItem, Scored, as_items, batch_payload
from common.rewards.user_fns import reward_value


def _probe(url: str, timeout_s: float) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RewardError(f"reward.url={url!r} is not an http(s):// URL: fix reward.url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise RewardError(
            f"reward server {url} is not reachable ({type(e).__name__}: {e}): start it, or fix reward.url"
        ) from None


class HttpReward(Reward):
    """Scores batches on a reward server (module docstring: protocol, timeouts, retries)."""

    name = "http"
    wants_prompts = True

    def __init__(self, url: str, *, retries: int = 3, backoff_s: float = 0.5, **kw: Any) -> None:
        super().__init__(**kw)
        self.url, self.retries, self.backoff_s = url, int(retries), float(backoff_s)
        _probe(url, self.timeout_s)

    def _post(self, body: bytes) -> Any:
        """One try: the decoded JSON answer, or an exception (retryable or not, see _send)."""
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def _send(self, body: bytes) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise RewardError(
                        f"reward server {self.url} refused the request (HTTP {e.code}: {detail}); "
                        "fix the server or the request format (module common.rewards.server)"
                    ) from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                last = f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:
                raise RewardError(f"reward server {self.url} answered with invalid JSON ({e})") from None
            self.stats.add(errors=1, last_error=last)
        raise RewardError(
            f"reward server {self.url} failed {self.retries + 1} times (last: {last}); check that it is up "
            f"and answers within reward.timeout_s={self.timeout_s} s, or raise reward.retries"
        )

    def judge_many(self, items: Iterable[RewardItem | tuple]) -> list[Scored]:
        t0 = time.perf_counter()
        items = as_items(items)
        if not items:
            return []
        answer = self._send(json.dumps({"items": batch_payload(items)}, default=str).encode())
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(items):
            raise RewardError(
                f"reward server {self.url} answered {str(answer)[:120]!r}; it must answer "
                f'{{"rewards": [...]}} with {len(items)} values (one per item, in order)'
            )
        try:
            base = [reward_value(v) for v in rewards]
        except TypeError as e:
            raise RewardError(f"reward server {self.url}: {e}") from None
        self.stats.add(calls=len(items), seconds=time.perf_counter() - t0)
        return self.verdicts(base, items)


__all__ = [
    "HttpReward",
]
