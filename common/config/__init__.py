"""Typed configuration: one dataclass per component, YAML presets, ``key=value`` overrides.

Every field has a default (the defaults ARE the CPU demo: ``treepo train`` with no arguments) and a
help text (``doc(...)``). Loading is strict: unknown keys, wrong types and inconsistent values raise
:class:`ConfigError` with ONE line naming the key and the fix, before anything starts. Nothing is
silently rewritten: a value the user set is either used as given or rejected.

A rule lives beside what it constrains: a field's allowed values (a ``Literal`` type, e.g.
:data:`TreeMode`) and lowest value in its declaration (:mod:`common.config.fields`), a section's own
rules in its ``check`` method, the rules that join sections in
:func:`common.config.validation.check_across_sections`.

- :mod:`common.config.generation`: model, data, tree, sampling, generators, reward
- :mod:`common.config.training`: algo, learner (and its lora)
- :mod:`common.config.run`: queue, sync, checkpoint, eval, log
- :mod:`common.config.schema`: :class:`TrainConfig`, every section together
- :mod:`common.config.validation`: :func:`validate`
- :mod:`common.config.loading`: :func:`load_config`, YAML in and out, ``--help-config``

This package must stay importable anywhere: it imports no torch, ray, vllm or redis.
"""

from __future__ import annotations

from omegaconf import MISSING

from common.config.fields import check_fields, choice, doc, flat_config, nested
from common.config.generation import (
    BUILTIN_REWARDS,
    Allocation,
    AnswerPolicy,
    BadRows,
    DataConfig,
    DType,
    Fallback,
    GenerationBackend,
    GeneratorConfig,
    LogprobsMode,
    ModelConfig,
    ProbScore,
    Remainder,
    RewardConfig,
    SamplingConfig,
    Template,
    TinySize,
    ToolFormat,
    ToolUseConfig,
    TreeConfig,
    TreeMode,
    check_segment_alignment,
)
from common.config.loading import (
    PRESET_DIR,
    from_yaml_text,
    help_table,
    load_config,
    parse_overrides,
    save_resolved,
    to_yaml,
)
from common.config.run import (
    TRACKERS,
    AppendFsync,
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    LogLevel,
    MlflowConfig,
    QueueConfig,
    SyncBackend,
    SyncConfig,
    SyncReceiver,
    Tracker,
    WandbConfig,
)
from common.config.schema import Driver, TrainConfig
from common.config.training import (
    LORA_REFUSED_TARGETS,
    AdvantageEstimator,
    Aggregation,
    AlgoConfig,
    IsCorrection,
    LearnerConfig,
    LoraConfig,
    MixedPrecision,
    PackedAttention,
    PackingMode,
)
from common.config.validation import check_across_sections, validate
from common.errors import ConfigError

__all__ = [
    "BUILTIN_REWARDS",
    "LORA_REFUSED_TARGETS",
    "MISSING",
    "PRESET_DIR",
    "TRACKERS",
    "AdvantageEstimator",
    "Aggregation",
    "AlgoConfig",
    "Allocation",
    "AnswerPolicy",
    "AppendFsync",
    "BadRows",
    "CheckpointConfig",
    "ConfigError",
    "DType",
    "DataConfig",
    "Driver",
    "EvalConfig",
    "Fallback",
    "GenerationBackend",
    "GeneratorConfig",
    "IsCorrection",
    "LearnerConfig",
    "LogConfig",
    "LogLevel",
    "LogprobsMode",
    "LoraConfig",
    "MixedPrecision",
    "MlflowConfig",
    "ModelConfig",
    "PackedAttention",
    "PackingMode",
    "ProbScore",
    "ToolFormat",
    "ToolUseConfig",
    "QueueConfig",
    "Remainder",
    "RewardConfig",
    "SamplingConfig",
    "SyncBackend",
    "SyncConfig",
    "SyncReceiver",
    "Template",
    "TinySize",
    "Tracker",
    "TrainConfig",
    "TreeConfig",
    "TreeMode",
    "WandbConfig",
    "check_across_sections",
    "check_fields",
    "check_segment_alignment",
    "choice",
    "doc",
    "from_yaml_text",
    "help_table",
    "flat_config",
    "load_config",
    "nested",
    "parse_overrides",
    "save_resolved",
    "to_yaml",
    "validate",
]
