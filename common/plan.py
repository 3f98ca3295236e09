"""Memory plan of a run: per-GPU bytes of an engine and of a learner rank, the weight sync's peak,
checkpoint size and resume read time. Pure arithmetic (no torch import): ``treepo plan`` prints it and
``treepo train`` refuses a config whose plan does not fit, before anything starts.

Model sizes come from ``config.json`` (``model.path`` as a local directory, else the Hugging Face hub
cache), else from :data:`KNOWN_ARCHS` (the presets' models and the tiny sizes). Everything else is the
config. The estimates and their assumptions, per GPU (GiB = 2^30 bytes):

Engine (vLLM, tensor parallel size ``tp = max(1, generators.gpus_per_engine)``): vLLM owns
``gpu_memory_utilization`` of the GPU and fills it with the weights (``P * bytes(model.dtype) / tp``),
the profiled activation peak (``max_num_batched_tokens`` tokens through one layer: ~``(4h + 2I) * 2``
bytes each in a 16-bit dtype, plus fp32 logits of ``MAX_NUM_SEQS`` sequences) and the KV cache
(the rest; ``2 * layers * kv_heads * head_dim * bytes / tp`` per token). The KV cache must hold at least
one sequence of ``data.max_prompt_tokens + tree.max_response_tokens`` tokens (vLLM refuses to start
otherwise). Outside vLLM's share: the CUDA context (``CUDA_CONTEXT_GIB``) and the weight-sync staging:
engine workers stage an update in host memory as it arrives (``actors/backends/worker_sync.py``), so
the GPU holds only the buckets in flight (two, each ``sync.bucket_mb`` or the largest tensor, which
travels alone), the sync group's NCCL buffers (``NCCL_BUFFERS_GIB``) and, while the update is applied,
one decoder layer reloaded at a time. Each side is planned per node type when ``nodes`` are given
(``treepo plan`` reads them from the Ray cluster YAMLs; GPU memory from ``INSTANCE_GPU_GIB``).

Learner rank (``N = learner.num_workers``; FSDP2 shards by ``N``, DDP replicates): master weights,
gradients and AdamW's two moments in ``learner.param_dtype`` (``(1 + 1 + 2) * P * bytes / N`` under
FSDP; with ``learner.grad_sync=last_micro_batch`` the gradient is FSDP2's unsharded accumulation,
``P`` times the reduce dtype's bytes, see :func:`gradient_bytes`); the bf16 compute copy (FSDP2: the root's embeddings/head plus two decoder layers gathered at a
time; autocast without FSDP: a bf16 copy of every weight, cached for the forward); activations of one
micro-batch of ``T = learner.micro_batch_tokens`` tokens: with checkpointing one hidden state per layer
(``L * T * h * 2``) plus one layer's recompute, without it every layer's (``L * T * (9h + 2 kv + 4I) *
2``); the logits (``T * V * 14`` bytes: bf16 logits, their fp32 copy, the log-softmax gradient and the
entropy's softmax); a reference model in ``model.dtype`` when ``algo.kl_coef > 0``; the CUDA context.
With ``learner.lora``: gradients and moments of the adapters only (``rank * (fan_in + fan_out)`` per
target layer), no reference model (the base with adapters off), a checkpoint of the adapter.
``LEARNER_MARGIN`` of the GPU is kept free for allocator fragmentation.

Sync peak (learner rank 0, between steps, no activations): the static state plus one gathered
parameter in ``param_dtype`` and its ``model.dtype`` copy (the largest parameter) plus the sender's two
bucket buffers. Checkpoint: the export in ``model.dtype`` plus, in ``sharded/``, the master weights and
AdamW's moments in ``param_dtype``; a resume reads ``sharded/`` once over all ranks (each its shard)
at ``read_gbps``; rank 0's host gathers the full master weights and their export copy at every save.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_GIB = 1.0  # CUDA context, NCCL buffers and other memory outside torch's allocator
LEARNER_MARGIN = 0.05  # share of a learner GPU kept free for allocator fragmentation
MAX_NUM_SEQS = 256  # vLLM's default concurrent sequences (its sampler's fp32 logits are profiled)
LOGIT_BYTES_PER_ENTRY = 14  # bf16 logits (2) + fp32 copy (4) + log-softmax gradient (4) + entropy softmax (4)
RESUME_WAIT_S = 600.0  # the pipeline's wait for the learner ranks to load a checkpoint
DEFAULT_READ_GBPS = 1.0  # shared file system read bandwidth (GB/s = 1e9 bytes/s) assumed by default
# The weight-sync communicator's own NCCL buffers on an engine GPU: per channel and peer NCCL keeps
# ~4 MiB (NCCL_BUFFSIZE, SIMPLE protocol) plus the LL/LL128 buffers, ~9 MiB; up to 32 channels and
# two ring peers on NVLink/InfiniBand nodes is ~0.6 GiB at most, ~0.3 GiB typically.
NCCL_BUFFERS_GIB = 0.5
# GPU memory (GiB) of the cloud instance types the cluster YAMLs use, for the plan per node type: the
# total the device reports (torch.cuda.mem_get_info, what vLLM's gpu_memory_utilization is a share
# of), a little under the nominal size.
INSTANCE_GPU_GIB: dict[str, float] = {
    "p4de.24xlarge": 79.35,  # 8 x A100-SXM4 80 GB
    "p4d.24xlarge": 39.59,  # 8 x A100-SXM4 40 GB
    "p5.48xlarge": 79.1,  # 8 x H100 80 GB
    "p5e.48xlarge": 139.8,  # 8 x H200 141 GB
    "a2-ultragpu-8g": 79.35,  # 8 x A100 80 GB
    "a2-highgpu-8g": 39.59,  # 8 x A100 40 GB
    "a3-highgpu-8g": 79.1,  # 8 x H100 80 GB
}


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only transformer (Qwen2/Llama layout) the plan needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden / heads
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.hd
        q = h * self.heads * self.hd + self.heads * self.hd  # with bias (Qwen2; a Llama has none: ~0.1 %)
        k = v = h * kv + kv
        o = self.heads * self.hd * h
        mlp = 3 * h * self.intermediate
        return q + k + v + o + mlp + 2 * h

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, rank: int, targets) -> int:
        """Adapter parameters of LoRA rank ``rank`` on the named linear layers of every decoder layer:
        ``rank * (fan_in + fan_out)`` each; a name outside the Qwen2/Llama layout counts as the largest."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        largest = max(a + b for a, b in shapes.values())
        per_layer = sum(sum(shapes.get(str(t).split(".")[-1], (largest, 0))) for t in targets)
        return self.layers * rank * per_layer

    def largest_param(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def _arch(c: dict[str, Any], source: str) -> Arch:
    try:
        return Arch(
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=int(c["num_attention_heads"]),
            kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            head_dim=int(c.get("head_dim") or 0),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{source} lacks a decoder field the memory plan needs ({e}): check the model"
        ) from e


# The presets' models (their config.json) and the tiny sizes (common/tiny.py's SIZES; a test keeps
# them equal), for planning without the model at hand.
KNOWN_ARCHS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-1.5B": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
TINY_VOCAB = 64
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "xs": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
    "s": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "m": dict(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def _hub_cached_config(repo_id: str) -> Path | None:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    snapshots = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def model_arch(model_cfg) -> Arch:
    """The model's architecture: its config.json (local directory, then the hub cache), else the table."""
    path = str(model_cfg.path)
    if path.startswith("tiny:"):
        size = model_cfg.tiny_size
        if size not in TINY_ARCHS:
            raise ConfigError(
                f"model.tiny_size={size!r} has no plan entry: use one of {', '.join(TINY_ARCHS)}"
            )
        return _arch(
            {**TINY_ARCHS[size], "vocab_size": TINY_VOCAB, "tie_word_embeddings": True}, f"tiny {size}"
        )
    local = Path(path) / "config.json"
    cached = None if local.is_file() else _hub_cached_config(path)
    for candidate in (local, cached):
        if candidate is not None and candidate.is_file():
            raw = json.loads(candidate.read_text())
            return _arch(raw.get("text_config", raw), str(candidate))
    if path in KNOWN_ARCHS:
        return _arch(KNOWN_ARCHS[path], f"built-in table ({path})")
    raise ConfigError(
        f"no config.json for model.path={path!r} (not a local directory, not in the hub cache, not in "
        "common/plan.py's table): download the model first to plan its memory"
    )


@dataclass(frozen=True)
class Node:
    """A node type a side may land on: its name (e.g. a Ray cluster YAML's node type) and GPU memory."""

    name: str
    gpu_gib: float


def _capacity_source(role: str, node: Node | None, default_gib: float) -> str:
    if node is None:
        return f"{'generators' if role == 'engine' else 'learner'}.gpu_memory_gib={default_gib:g}"
    return f"node type {node.name}'s {node.gpu_gib:g} GiB"


@dataclass
class Side:
    """One GPU's budget: named parts in bytes, the capacity they must fit, and the fix when they do not."""

    name: str
    capacity: float
    parts: dict[str, float] = field(default_factory=dict)
    limit: float = 0.0  # what the parts must stay under (capacity minus what is reserved)
    fix: str = ""  # one line naming the key to change, set when it does not fit
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return not self.fix

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacity_gib": self.capacity / GIB,
            "limit_gib": self.limit / GIB,
            "total_gib": self.total / GIB,
            "parts_gib": {k: v / GIB for k, v in self.parts.items()},
            "fits": self.fits,
            "fix": self.fix,
            "notes": list(self.notes),
        }


@dataclass
class Plan:
    """The plan; ``engines`` and ``learners`` hold one side per node type (one without node types)."""

    arch: Arch
    params: int
    engines: list[Side]
    learners: list[Side]
    sync_peak: dict[str, float]
    checkpoint: dict[str, float]

    @property
    def engine(self) -> Side:
        return self.engines[0]

    @property
    def learner(self) -> Side:
        return self.learners[0]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in (*self.engines, *self.learners))

    def refusals(self, sides: tuple[str, ...] | list[str] = ("engine", "learner")) -> list[str]:
        """The one-line fixes of the named sides (every node type of each) that do not fit."""
        return [
            s.fix
            for name, group in (("engine", self.engines), ("learner", self.learners))
            if name in sides
            for s in group
            if s.fix
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": {**asdict(self.arch), "params": self.params},
            "engine": self.engine.as_dict(),
            "learner_rank": self.learner.as_dict(),
            "engines_by_node": {s.name: s.as_dict() for s in self.engines},
            "learner_ranks_by_node": {s.name: s.as_dict() for s in self.learners},
            "sync_peak": self.sync_peak,
            "checkpoint": self.checkpoint,
            "fits": self.fits,
        }


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _side_name(role: str, node: Node | None) -> str:
    return role if node is None else f"{role} on {node.name} ({node.gpu_gib:g} GiB GPUs)"


def sync_staging(cfg, arch: Arch) -> dict[str, float]:
    """An engine GPU's weight-sync staging: two buckets in flight (a bucket is ``sync.bucket_mb`` or the
    largest tensor, which travels alone: the untied embedding or head), the communicator's NCCL
    buffers, and one decoder layer reloaded at a time while the update is applied."""
    wb = DTYPE_BYTES[cfg.model.dtype]
    tp = max(1, int(cfg.generators.gpus_per_engine))
    bucket = max(cfg.sync.bucket_mb * (1 << 20), arch.largest_param() * wb)
    nccl = NCCL_BUFFERS_GIB * GIB if cfg.sync.backend != "gloo" else 0.0
    return {
        "buckets_in_flight": 2 * bucket,
        "nccl_buffers": nccl,
        "layer_reload": arch.layer_params() * wb / tp,
    }


def engine_side(cfg, arch: Arch, params: int, node: Node | None = None) -> Side:
    g = cfg.generators
    tp = max(1, int(g.gpus_per_engine))
    wb = DTYPE_BYTES[cfg.model.dtype]
    capacity = float(node.gpu_gib if node else g.gpu_memory_gib) * GIB
    budget = float(g.gpu_memory_utilization) * capacity
    weights = params * wb / tp
    per_token = 2 * arch.layers * arch.kv_heads * arch.hd * wb / tp
    act = g.max_num_batched_tokens * (4 * arch.hidden + 2 * arch.intermediate / tp) * 2
    act += MAX_NUM_SEQS * arch.vocab * 4 / tp
    max_len = cfg.data.max_prompt_tokens + cfg.tree.max_response_tokens
    kv = budget - weights - act
    side = Side(_side_name("engine", node), capacity, limit=capacity)
    side.parts = {"weights": weights, "activations": act, "kv_cache": max(kv, 0.0)}
    staging = sync_staging(cfg, arch)
    outside = {"cuda_context": CUDA_CONTEXT_GIB * GIB, "sync_staging": sum(staging.values())}
    side.parts.update(outside)
    tokens = max(kv, 0.0) / per_token
    side.notes.append(
        f"KV cache {_gib(max(kv, 0.0))} GiB = {int(tokens)} tokens = {tokens / max_len:.1f} sequences of {max_len} tokens"
    )
    side.notes.append(
        "sync staging = " + " + ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in staging.items())
    )
    room = capacity - budget
    if weights + act >= budget:
        side.fix = (
            f"the engine's weights and activations ({_gib(weights + act)} GiB) exceed its share of the GPU "
            f"({_gib(budget)} GiB): raise generators.gpus_per_engine (tensor parallel) to {tp * 2}"
        )
    elif tokens < max_len:
        need = (weights + act + max_len * per_token) / capacity
        side.fix = (
            f"the engine's KV cache holds {int(tokens)} tokens, less than one sequence of {max_len}: raise "
            f"generators.gpu_memory_utilization to >= {math.ceil(need * 100) / 100:.2f}"
        )
    elif sum(outside.values()) > room:
        most = (capacity - sum(outside.values())) / capacity
        side.fix = (
            f"the engine's CUDA context and weight-sync staging ({sum(outside.values()) / GIB:.3f} GiB) do not "
            f"fit beside vLLM's share ({room / GIB:.3f} GiB left): lower generators.gpu_memory_utilization to "
            f"<= {math.floor(most * 100) / 100:.2f}"
        )
    if node is not None and side.fix:
        side.fix = f"on node type {node.name} ({node.gpu_gib:g} GiB GPUs): {side.fix}"
    return side


def _activations(cfg, arch: Arch, checkpointing: bool) -> float:
    t = cfg.learner.micro_batch_tokens
    per_layer = t * (9 * arch.hidden + 2 * arch.kv_heads * arch.hd + 4 * arch.intermediate) * 2
    if checkpointing:
        return arch.layers * t * arch.hidden * 2 + per_layer
    return arch.layers * per_layer


def gradient_bytes(cfg, arch: Arch, params: int, grad_sync: str | None = None) -> float:
    """A learner rank's gradients during accumulation. FSDP2 with ``learner.grad_sync=last_micro_batch``
    accumulates an unsharded gradient of the whole model in its reduce dtype (fp32 under the bf16
    policy, else ``param_dtype``) until the last micro-batch, whose backward reduce-scatters it layer by
    layer into the sharded gradient (each layer's unsharded one freed as its shard appears);
    ``every_micro_batch`` reduce-scatters after each backward, so only the shard is kept."""
    lr = cfg.learner
    pb = DTYPE_BYTES[lr.param_dtype]
    if lr.lora.rank > 0:  # the adapters only; the base is frozen (and LoRA is never sharded)
        return arch.lora_params(lr.lora.rank, lr.lora.target_modules) * pb
    if lr.fsdp and (grad_sync or lr.grad_sync) == "last_micro_batch":
        return params * (4 if lr.mixed_precision == "bf16" else pb)
    return params * pb / (lr.num_workers if lr.fsdp else 1)


def learner_side(cfg, arch: Arch, params: int, node: Node | None = None) -> Side:
    lr = cfg.learner
    pb = DTYPE_BYTES[lr.param_dtype]
    shards = lr.num_workers if lr.fsdp else 1
    capacity = float(node.gpu_gib if node else lr.gpu_memory_gib) * GIB
    side = Side(_side_name("learner rank", node), capacity, limit=capacity * (1 - LEARNER_MARGIN))
    static = params * pb / shards
    # learner.lora: gradients and AdamW moments of the adapters only; the base is frozen
    lora = lr.lora.rank > 0
    trained = arch.lora_params(lr.lora.rank, lr.lora.target_modules) * pb if lora else static
    grads = gradient_bytes(cfg, arch, params)
    side.parts = {"master_weights": static, "gradients": grads, "optimizer": 2 * trained}
    if lr.fsdp and not lora:
        side.notes.append(
            f"gradients {_gib(grads)} GiB with learner.grad_sync={lr.grad_sync} (every_micro_batch: "
            f"{_gib(gradient_bytes(cfg, arch, params, 'every_micro_batch'))} sharded, last_micro_batch: "
            f"{_gib(gradient_bytes(cfg, arch, params, 'last_micro_batch'))} unsharded)"
        )
    if lr.mixed_precision == "bf16" and pb != 2:
        if lr.fsdp:
            root = arch.vocab * arch.hidden * (1 if arch.tied else 2)
            side.parts["bf16_compute_copy"] = (root + 2 * arch.layer_params()) * 2
        else:
            side.parts["bf16_compute_copy"] = params * 2
    with_ckpt, without = _activations(cfg, arch, True), _activations(cfg, arch, False)
    side.parts["activations"] = with_ckpt if lr.activation_checkpointing else without
    side.parts["logits"] = lr.micro_batch_tokens * arch.vocab * LOGIT_BYTES_PER_ENTRY
    if cfg.algo.kl_coef > 0 and not lora:  # with LoRA the reference is the base, adapters off
        side.parts["reference_model"] = params * DTYPE_BYTES[cfg.model.dtype]
    side.parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    side.notes.append(f"activations {_gib(with_ckpt)} GiB with checkpointing, {_gib(without)} GiB without")
    if side.total <= side.limit:
        return side
    over = side.total - side.limit
    fixed = side.total - side.parts["activations"] - side.parts["logits"]
    sharded_grads = gradient_bytes(cfg, arch, params, "every_micro_batch")
    if side.total - grads + sharded_grads <= side.limit < side.total:
        side.fix = "set learner.grad_sync=every_micro_batch (keep the gradient sharded)"
    elif not lr.activation_checkpointing and side.total - without + with_ckpt <= side.limit:
        side.fix = "set learner.activation_checkpointing=true"
    elif fixed < side.limit:
        per_token = (side.parts["activations"] + side.parts["logits"]) / lr.micro_batch_tokens
        most = int((side.limit - fixed) / per_token)
        side.fix = f"lower learner.micro_batch_tokens to <= {most}"
    elif lora:
        side.fix = (
            "the frozen base does not fit one GPU and LoRA is not sharded: use larger GPUs, or "
            "learner.lora.rank=0 with learner.fsdp=true"
        )
    elif not lr.fsdp:
        side.fix = "set learner.fsdp=true (shard the weights and optimizer over the ranks)"
    else:
        side.fix = f"raise learner.num_workers above {lr.num_workers} (more shards)"
    side.fix = (
        f"a learner rank needs {_gib(side.total)} GiB, {_gib(over)} GiB over {_gib(side.limit)} GiB "
        f"({100 * (1 - LEARNER_MARGIN):.0f} % of {_capacity_source('learner', node, lr.gpu_memory_gib)}): {side.fix}"
    )
    return side


def make_plan(
    cfg,
    *,
    read_gbps: float = DEFAULT_READ_GBPS,
    arch: Arch | None = None,
    nodes: dict[str, list[Node]] | None = None,
) -> Plan:
    """The memory plan of ``cfg`` (a validated ``TrainConfig``). ``nodes``: the node types each side
    ("engine", "learner") may land on, one plan of that side per type; a side without node types is
    planned on ``generators.gpu_memory_gib`` / ``learner.gpu_memory_gib``."""
    arch = arch or model_arch(cfg.model)
    params = arch.params()
    nodes = nodes or {}
    engines = [engine_side(cfg, arch, params, n) for n in nodes.get("engine") or [None]]
    learners = [learner_side(cfg, arch, params, n) for n in nodes.get("learner") or [None]]
    engine, learner = engines[0], learners[0]
    pb, wb = DTYPE_BYTES[cfg.learner.param_dtype], DTYPE_BYTES[cfg.model.dtype]
    static = sum(learner.parts[k] for k in ("master_weights", "optimizer"))
    bucket = cfg.sync.bucket_mb * (1 << 20)
    gathered = arch.largest_param() * (pb + wb)
    sync = {
        "learner_rank0_gib": (static + gathered + 2 * bucket + CUDA_CONTEXT_GIB * GIB) / GIB,
        "engine_gpu_staging_gib": engine.parts["sync_staging"] / GIB,
        "engine_host_staging_gib": params * wb / GIB,
        "bytes_sent_gib": params * wb / GIB,
    }
    lora = cfg.learner.lora.rank > 0
    sharded = not lora and (cfg.learner.fsdp or cfg.learner.param_dtype != cfg.model.dtype)
    export = params * wb
    master = params * pb * (1 if sharded else 0)
    optim = 2 * params * pb
    if lora:  # the adapter (adapter/) and its AdamW moments; model.safetensors is the merged export
        adapter = arch.lora_params(cfg.learner.lora.rank, cfg.learner.lora.target_modules) * pb
        master, optim = adapter, 2 * adapter
    resume_bytes = (master + optim) if sharded else cfg.learner.num_workers * (export + optim)
    if lora:  # each rank reads the adapter and its moments (the base comes from model.path)
        resume_bytes = cfg.learner.num_workers * (master + optim)
    resume_s = resume_bytes / (read_gbps * 1e9)
    checkpoint = {
        "size_gib": (export + master + optim) / GIB,
        "export_gib": export / GIB,
        "master_gib": master / GIB,
        "optimizer_gib": optim / GIB,
        "resume_read_gib": resume_bytes / GIB,
        "resume_read_s": resume_s,
        "read_gbps": read_gbps,
        "resume_within_wait": resume_s <= RESUME_WAIT_S,
        "rank0_host_at_save_gib": (params * pb + export) / GIB,
    }
    return Plan(arch, params, engines, learners, sync, checkpoint)


def gpu_sides(cfg) -> list[str]:
    """The sides that run on GPUs (the ones whose memory is checked)."""
    sides = []
    if cfg.generators.gpus_per_engine > 0 and cfg.generators.backend == "vllm":
        sides.append("engine")
    if cfg.learner.gpus_per_worker > 0:
        sides.append("learner")
    return sides


def check_fits(cfg) -> Plan | None:
    """Raise ConfigError (one line naming the key) when a GPU side of ``cfg`` does not fit; None when
    no side runs on a GPU (CPU runs are not planned)."""
    sides = gpu_sides(cfg)
    if not sides:
        return None
    plan = make_plan(cfg)
    for fix in plan.refusals(sides):
        raise ConfigError(f"memory plan: {fix} (see `treepo plan`)")
    return plan


def table(plan: Plan) -> str:
    """The plan as a text table."""
    a = plan.arch
    lines = [
        f"model: {plan.params / 1e9:.2f} B parameters ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; {a.source})",
        "",
    ]
    for side in (*plan.engines, *plan.learners):
        lines.append(f"{side.name} (per GPU, GiB)")
        for k, v in side.parts.items():
            lines.append(f"  {k:<20} {v / GIB:8.2f}")
        verdict = "fits" if side.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<20} {side.total / GIB:8.2f}  of {_gib(side.limit)} -> {verdict}")
        lines.extend(f"  {n}" for n in side.notes)
        if side.fix:
            lines.append(f"  fix: {side.fix}")
        lines.append("")
    lines.append("weight sync peak (GiB)")
    lines.extend(f"  {k:<24} {v:8.2f}" for k, v in plan.sync_peak.items())
    lines.append("")
    c = plan.checkpoint
    lines.append("checkpoint")
    lines.append(
        f"  size {c['size_gib']:.1f} GiB (export {c['export_gib']:.1f}, master {c['master_gib']:.1f}, "
        f"optimizer {c['optimizer_gib']:.1f}); rank 0 host memory at a save {c['rank0_host_at_save_gib']:.1f} GiB"
    )
    within = "within" if c["resume_within_wait"] else "OVER"
    lines.append(
        f"  resume reads {c['resume_read_gib']:.1f} GiB in {c['resume_read_s']:.0f} s at {c['read_gbps']:g} GB/s "
        f"({within} the {RESUME_WAIT_S:.0f} s load wait)"
    )
    return "\n".join(lines)
