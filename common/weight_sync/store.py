"""The group's rendezvous store and who may use it.

Rank 0 (the sender, on learner rank 0) is the master of a ``TCPStore`` on (host, port); receivers
(ranks 1..N, one per engine worker) are its clients. Every key of generation ``g`` lives under the
prefix ``treepo-wsync-g<g>``, except ``treepo-wsync-current`` (:data:`CURRENT_KEY`), where the sender
publishes the group it serves (generation, world size, backend, the token's hash) so a receiver holding
stale connection details fails at once with a clear message instead of waiting. Each receiver claims
its rank with an atomic ``add`` (two receivers claiming one rank fail loudly); the sender waits for
every claim, with the timeout, naming the ranks that never came; then the transport builds its group
on the prefixed store (:mod:`common.weight_sync.transport`).

Access. A ``TCPStore`` has no authentication and listens on every interface, so whoever reaches its
port could claim a receiver's rank, read the gloo/NCCL rendezvous keys and join the group (and get
the weights). A secured sender (:meth:`WeightSender.from_config`, which the pipeline uses; or
``token=...``) draws a fresh random token for every generation and keeps every key of the group
(rank claims, the backend's rendezvous) under ``treepo-wsync-g<g>-<token>``: the store offers no way
to list keys, so without the token nothing of the group can be read, claimed or joined; a receiver
with a wrong or no token never joins (the sender's wait names the missing ranks) and cannot take a
legitimate receiver's rank. The token travels in :class:`SyncGroupInfo` through Ray calls (which Ray's
token authentication protects) and never into a repr. What is left: the store still accepts
connections, so an outsider can overwrite the public ``treepo-wsync-current`` record or flood the
port (denial of service, which the timeouts turn into a SyncError and a rebuild), and the
point-to-point gloo/NCCL connections after the rendezvous are not authenticated: keep these ports
inside the cluster's security group (the cluster YAMLs do).
"""

from __future__ import annotations

import datetime
import hashlib
import secrets

import msgpack
from torch.distributed import PrefixStore, Store, TCPStore

from common.errors import SyncError
from common.weight_sync.wire import SCHEMA_VERSION

CURRENT_KEY = "treepo-wsync-current"


def group_prefix(generation: int, token: str = "") -> str:
    """The prefix of every key of generation ``generation`` (secured groups add their token)."""
    return f"treepo-wsync-g{generation}-{token}" if token else f"treepo-wsync-g{generation}"


def token_hash(token: str) -> str:
    """What the public record shows of a token: its SHA-256 ('' for an unsecured group)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def new_token() -> str:
    """A generation's secret: 128 random bits."""
    return secrets.token_hex(16)


def open_master_store(host: str, port: int, timeout: datetime.timedelta) -> TCPStore:
    """The sender's store on ``host:port`` (0 = any free port)."""
    try:
        return TCPStore(
            host_name=host,
            port=int(port),
            world_size=None,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
        )
    except Exception as e:  # DistNetworkError: address in use, bad host
        raise SyncError(
            f"cannot open the weight-sync store on {host}:{port} ({type(e).__name__}: {e}); "
            "pick another port (0 = any free port)"
        ) from e


def publish_group(store: Store, generation: int, world_size: int, backend: str, token: str) -> None:
    """Write the public record of the group the sender serves now."""
    store.set(
        CURRENT_KEY,
        msgpack.packb(
            {
                "schema": SCHEMA_VERSION,
                "generation": generation,
                "world_size": world_size,
                "backend": backend,
                # lets a receiver with a wrong token fail at once; the hash reveals nothing of it
                "token_sha256": token_hash(token),
            }
        ),
    )


def reach_store(host: str, port: int, timeout: datetime.timedelta) -> tuple[TCPStore, dict]:
    """A receiver's connection to the sender's store and the record published there (raises what the
    store raises: DistNetworkError / DistStoreError after ``timeout``)."""
    store = TCPStore(host_name=host, port=port, world_size=None, is_master=False, timeout=timeout)
    return store, msgpack.unpackb(store.get(CURRENT_KEY), raw=False)


def group_store(store: Store, generation: int, token: str) -> PrefixStore:
    """The keys of one generation (rank claims and the transport's rendezvous)."""
    return PrefixStore(group_prefix(generation, token), store)


def claim_rank(store: Store, rank: int) -> bool:
    """Claim ``rank`` in a generation's store; False when another receiver holds it already."""
    return store.add(f"rank-{rank}", 1) == 1


def rank_keys(world_size: int) -> list[str]:
    """The claim keys of the receivers' ranks 1..world_size-1."""
    return [f"rank-{r}" for r in range(1, world_size)]


def unclaimed_ranks(store: Store, world_size: int) -> list[int]:
    """The receiver ranks nobody claimed yet."""
    return [r for r, k in enumerate(rank_keys(world_size), start=1) if not store.check([k])]
