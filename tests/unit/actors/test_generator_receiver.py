"""``sync.receiver=generator`` is refused where the generator's engine has GPUs: the generator's
process would receive every bucket of an update onto its GPU and hold them all until the segment
boundary applies them (a second copy of the model, and a second CUDA context beside the engine's).
The engine's workers (``engine_workers``, or ``auto``) stage each bucket to the host instead."""

from __future__ import annotations

import pytest

from common.config import load_config
from common.errors import ConfigError


def test_generator_receiver_is_refused_on_gpu():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["generators.gpus_per_engine=1", "sync.receiver=generator"])
    msg = str(err.value)
    assert "\n" not in msg and "generators.gpus_per_engine > 0" in msg
    assert "sync.receiver=engine_workers" in msg and "auto" in msg


@pytest.mark.parametrize("preset", ["qwen2.5-7b-treepo", "qwen2.5-1.5b-treepo"])
def test_gpu_presets_refuse_it_too(preset, monkeypatch):
    monkeypatch.setenv("TREEPO_QUEUE_URL", "redis://127.0.0.1:6390/0")
    with pytest.raises(ConfigError, match="sync.receiver=generator holds every weight bucket"):
        load_config(f"configs/{preset}.yaml", ["sync.receiver=generator"])
    load_config(f"configs/{preset}.yaml", ["sync.receiver=auto"])


@pytest.mark.parametrize("receiver", ["generator", "auto"])
def test_cpu_generators_keep_every_mode(receiver):
    assert load_config(None, [f"sync.receiver={receiver}"]).sync.receiver == receiver
