"""Validation: every field's own rules, then each section's ``check``, then the rules that join two
sections (:func:`check_across_sections`, the one place for them). Raises :class:`ConfigError` with
one line naming the key and the fix.
"""

from __future__ import annotations

from common.config.fields import check_fields
from common.config.generation import check_segment_alignment
from common.config.schema import TrainConfig
from common.errors import ConfigError
from common.schedule import check_sync_every


def check_across_sections(cfg: TrainConfig) -> None:
    """Rules between sections: segment alignment and the engine's blocks, FSDP and the driver, the
    weight-sync backend and receiver against the hardware and the backend, the overlong buffer against
    the response length, evaluation against its data, the pipeline's sync bound."""
    check_segment_alignment(cfg.tree, cfg.generators)
    lr, gen = cfg.learner, cfg.generators
    if lr.fsdp and cfg.driver != "ray":
        raise ConfigError(
            "learner.fsdp=true shards over the learner ranks' process group, which the pipeline builds "
            "(driver=local runs one rank without one): set driver=ray, or learner.fsdp=false"
        )
    if cfg.sync.backend == "nccl" and (lr.gpus_per_worker == 0 or gen.gpus_per_engine == 0):
        raise ConfigError(
            "sync.backend=nccl needs GPUs on learners and generators: use sync.backend=auto or gloo"
        )
    if cfg.sync.receiver == "engine_workers" and gen.backend != "vllm":
        raise ConfigError(
            f"sync.receiver=engine_workers needs generators.backend=vllm (got {gen.backend!r}): "
            "use sync.receiver=auto or generator"
        )
    if cfg.sync.receiver == "generator" and gen.gpus_per_engine > 0:
        raise ConfigError(
            "sync.receiver=generator holds every weight bucket of an update on the generator's GPU (a "
            "second copy of the model and a second CUDA context beside the engine's) when "
            "generators.gpus_per_engine > 0: use sync.receiver=engine_workers or auto"
        )
    longest = cfg.tree.max_response_tokens
    if cfg.reward.overlong_buffer > longest:
        raise ConfigError(
            f"reward.overlong_buffer={cfg.reward.overlong_buffer} > tree.max_response_tokens={longest}: "
            f"set it <= {longest}"
        )
    if cfg.eval.every_steps and not cfg.data.eval:
        raise ConfigError("eval.every_steps > 0 but data.eval is empty: set data.eval or eval.every_steps=0")
    if cfg.driver == "ray":  # the pipeline's off-policy schedule (generators admit by the weights they hold)
        check_sync_every(cfg)


def validate(cfg: TrainConfig) -> None:
    """Check every value and every cross-field rule; raise ConfigError naming the key and the fix."""
    check_fields(cfg)
    cfg.model.check()
    cfg.data.check()
    cfg.tree.check()
    cfg.sampling.check()
    cfg.generators.check()
    cfg.reward.check()
    cfg.algo.check()
    cfg.learner.check()
    cfg.queue.check()
    cfg.log.check()
    check_across_sections(cfg)
