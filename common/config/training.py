"""The training side's sections: advantages and the loss, LoRA adapters, the learner group and its
optimizer. Each section checks its own rules (``check``); rules that join two sections live in
:mod:`common.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config.fields import choice, doc, nested
from common.config.generation import DType
from common.errors import ConfigError

AdvantageEstimator = Literal["treepo", "grpo", "reinforce_pp_baseline"]  # algo.advantage
Aggregation = Literal["average", "group_size"]  # algo.aggregation
IsCorrection = Literal["token", "sequence", "sequence_product", "mask", "none"]  # algo.is_correction


@dataclass
class AlgoConfig:
    advantage: str = choice(
        AdvantageEstimator, "treepo", "Advantage estimator: 'treepo' | 'grpo' | 'reinforce_pp_baseline'."
    )
    aggregation: str = choice(
        Aggregation, "average", "TreePO subgroup aggregation: 'average' | 'group_size'."
    )
    subgroup_std_filter: bool = doc(False, "Drop subgroup terms whose rewards all agree (hurt in the paper).")
    whiten: bool = doc(True, "Token-weighted whitening of advantages over the batch.")
    dynamic_sampling: bool = doc(
        True,
        "Drop prompts whose leaves are all correct or all wrong (the reward's verdict, before the overlong penalty).",
    )
    clip_low: float = doc(0.2, "PPO clip epsilon below 1.", at_least=0.0)
    clip_high: float = doc(0.28, "PPO clip epsilon above 1 (clip-higher).", at_least=0.0)
    dual_clip: float = doc(10.0, "Dual-clip constant c > 1 for negative advantages (0 disables).")
    is_correction: str = choice(
        IsCorrection,
        "token",
        "Off-policy correction from behavior logprobs: 'token' | 'sequence' (geometric mean) | 'sequence_product' | 'mask' | 'none'.",
    )
    is_cap: float = doc(
        2.0,
        "Truncation C of the importance weight min(pi_prox/pi_behavior, C) (mask bounds for 'mask').",
        at_least=1.0,
    )
    kl_coef: float = doc(
        0.0, "k3 KL penalty to a frozen reference policy (0 = no reference model).", at_least=0.0
    )
    max_staleness: int = doc(
        1, "Drop leaves sampled more than this many policy versions ago (0 = synchronous).", at_least=0
    )

    def check(self) -> None:
        if self.dual_clip != 0.0 and self.dual_clip <= 1.0:
            raise ConfigError(
                f"algo.dual_clip={self.dual_clip} must be > 1, or 0 to disable it: fix algo.dual_clip"
            )


LORA_REFUSED_TARGETS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out")


@dataclass
class LoraConfig:
    rank: int = doc(
        0,
        "LoRA rank (0 = off: every weight trains). > 0: low-rank adapters (peft, the 'lora' extra) on "
        "target_modules train, the base stays frozen; engines get the merged weights, checkpoints hold "
        "the adapter (adapter/) beside the merged HF export.",
        at_least=0,
    )
    alpha: float = doc(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    target_modules: list = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Names (last part) of the linear layers that get adapters, e.g. "
        "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]; embeddings and lm_head are refused.",
    )

    def check(self) -> None:
        if self.rank == 0:
            return
        if self.alpha <= 0:
            raise ConfigError(f"learner.lora.alpha={self.alpha} must be > 0: e.g. learner.lora.alpha=16")
        targets = [str(t) for t in self.target_modules]
        if not targets or any(not t.strip() for t in targets):
            raise ConfigError(
                f"learner.lora.target_modules={targets} must name layers: e.g. "
                "learner.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"
            )
        refused = [t for t in targets if t.split(".")[-1] in LORA_REFUSED_TARGETS]
        if refused:
            raise ConfigError(
                f"learner.lora.target_modules names {refused[0]!r}: LoRA on embeddings or the output head is "
                "not supported (they are often tied); adapt linear layers only, e.g. q_proj,k_proj,v_proj,o_proj"
            )


PackingMode = Literal["tree", "flat", "none"]  # learner.packing
PackedAttention = Literal["auto", "runs", "mask"]  # learner.packed_attention
MixedPrecision = Literal["none", "bf16"]  # learner.mixed_precision
GradSync = Literal["every_micro_batch", "last_micro_batch"]  # learner.grad_sync


@dataclass
class LearnerConfig:
    num_workers: int = doc(1, "Learner ranks (torch.distributed world size).", at_least=1)
    gpus_per_worker: int = doc(0, "GPUs per learner rank (0 = CPU, gloo, DDP).", at_least=0)
    gpu_memory_gib: float = doc(
        80.0,
        "Memory of one learner GPU in GiB (A100-80GB: 80), for the memory plan (see generators.gpu_memory_gib).",
        at_least=1.0,
    )
    prompts_per_step: int = doc(8, "Prompts (trees) per optimizer step, after filtering.", at_least=1)
    mini_batch_prompts: int = doc(
        8, "Prompts per PPO mini-batch (one optimizer step each); divides prompts_per_step.", at_least=1
    )
    micro_batch_tokens: int = doc(
        4096,
        "Token budget of one packed micro-batch (gradient accumulation fills the mini-batch).",
        at_least=1,
    )
    packing: str = choice(
        PackingMode,
        "tree",
        "How leaves become model rows: 'tree' (each prompt's leaves packed as a prefix tree, every "
        "distinct token computed once) | 'flat' (padding-free: sequences concatenated, block-diagonal "
        "attention) | 'none' (one right-padded row per leaf).",
    )
    packed_attention: str = choice(
        PackedAttention,
        "auto",
        "Attention of packed rows: 'auto' = 'runs' (each run of new tokens attends to its ancestors, one "
        "batched sdpa call per group of similar runs, no T x T mask) | 'mask' (the model's sdpa/eager attention with a dense 4-D mask).",
    )
    ppo_epochs: int = doc(1, "Passes over each batch.", at_least=1)
    lr: float = doc(1e-4, "AdamW learning rate.", at_least=0.0)
    warmup_steps: int = doc(2, "Linear learning-rate warm-up steps.", at_least=0)
    weight_decay: float = doc(0.1, "AdamW weight decay.")
    betas: list = doc([0.9, 0.999], "AdamW betas.")
    grad_clip: float = doc(1.0, "Gradient-norm clip.", at_least=0.0)
    fsdp: bool = doc(
        False,
        "Shard with FSDP2 over the learner ranks (driver=ray; NCCL on GPU, gloo on CPU); DDP otherwise.",
    )
    param_dtype: str = choice(
        DType,
        "float32",
        "dtype of the learner's master weights and optimizer state: float32 | bfloat16 | float16. fp32 "
        "keeps small updates (a 1e-6 step on a bf16 weight of 0.02 rounds away); model.dtype is what "
        "engines and checkpoint exports get.",
    )
    mixed_precision: str = choice(
        MixedPrecision,
        "none",
        "Compute dtype of the learner's forward/backward: 'bf16' (FSDP2's MixedPrecisionPolicy when "
        "sharded, torch.autocast otherwise, on GPU and CPU; gradients reduced in fp32) | 'none' (param_dtype).",
    )
    activation_checkpointing: bool = doc(False, "Recompute activations in the backward pass.")
    grad_sync: str = choice(
        GradSync,
        "every_micro_batch",
        "When FSDP2 reduce-scatters gradients during accumulation (learner.fsdp only; DDP's replicated "
        "gradients cost the same memory either way and sync on the last micro-batch): "
        "'every_micro_batch' (after each micro-batch's backward: one reduce-scatter per micro-batch, the "
        "gradient stays sharded, 4 x params / ranks bytes in fp32) | 'last_micro_batch' (once per "
        "mini-batch: less communication, but every rank holds an unsharded fp32 gradient of the whole "
        "model until then, 4 x params bytes: 28 GiB for a 7B model). `treepo plan` counts the choice.",
    )
    total_steps: int = doc(60, "Optimizer steps to run (stops earlier when the data runs out).", at_least=1)
    ray_resources: dict[str, float] = doc(
        {},
        "Extra Ray resources each learner rank requests (in its placement-group bundle), e.g. "
        "{learner_node: 1} to pin the learner group to nodes started with that custom resource.",
    )
    lora: LoraConfig = nested(LoraConfig, "LoRA adapters instead of full fine-tuning.")

    def check(self) -> None:
        if self.mini_batch_prompts > self.prompts_per_step:
            raise ConfigError(
                f"learner.mini_batch_prompts={self.mini_batch_prompts} > learner.prompts_per_step="
                f"{self.prompts_per_step}: set learner.mini_batch_prompts <= {self.prompts_per_step}"
            )
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(
                f"learner.mini_batch_prompts={self.mini_batch_prompts} does not divide learner.prompts_per_step="
                f"{self.prompts_per_step}: choose a divisor"
            )
        if self.mini_batch_prompts % self.num_workers:
            raise ConfigError(
                f"learner.mini_batch_prompts={self.mini_batch_prompts} is not divisible by learner.num_workers="
                f"{self.num_workers}: every rank needs the same number of prompts; choose a multiple"
            )
        if len(self.betas) != 2 or not all(0.0 <= float(x) < 1.0 for x in self.betas):
            raise ConfigError(
                f"learner.betas={list(self.betas)} must be two numbers in [0, 1): e.g. learner.betas=[0.9,0.999]"
            )
        self.lora.check()
        if self.lora.rank and self.fsdp:
            raise ConfigError(
                "learner.lora.rank > 0 with learner.fsdp=true is not supported: set learner.fsdp=false (the "
                "frozen base is replicated, the adapters are small) or learner.lora.rank=0"
            )
