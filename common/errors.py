"""The project's exception hierarchy: small, picklable (Ray re-raises it at the driver), one base."""

from __future__ import annotations


class TreepoError(Exception):
    """Base of every error this project raises on purpose. The message says what is wrong and the fix."""

    def __reduce__(self):  # keep subclasses picklable across Ray even with custom __init__
        return (type(self), self.args)


class ConfigError(TreepoError):
    """A configuration value, preset or override is invalid (one line naming the key and the fix)."""


class DataError(TreepoError):
    """A dataset file or row is malformed (names the file, the row and the reason)."""


class ModelError(TreepoError):
    """A model cannot be built or loaded."""


class RewardError(TreepoError):
    """A reward function cannot be resolved or is unusable."""


class WireError(TreepoError):
    """A serialized entry (tree, weight-sync metadata) failed validation."""


class CheckpointError(TreepoError):
    """A checkpoint is missing, truncated or corrupt."""


class SyncError(TreepoError):
    """A weight synchronisation failed or timed out."""


class QueueError(TreepoError):
    """The replay queue is unreachable or in an unexpected state."""
