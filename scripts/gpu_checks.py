#!/usr/bin/env python3
"""GPU checks of the paths that need nothing but torch: a bf16 FSDP2 learner step, tree vs flat sampling
with the transformers backend, and bucketed weight-sync packing, all on CUDA. One JSON and one table.

On a GPU machine that has python and torch (CUDA) only — no Ray, no vLLM, no network — build the
pure-python dependencies here once, then carry them along:

    bash scripts/gpu_vendor.sh                                           # here: .gpu-vendor/
    PYTHONPATH=.gpu-vendor:. python3 scripts/gpu_checks.py --out $OUT    # there, carry [".gpu-vendor"]

The same code paths at CPU sizes (gloo instead of NCCL; seconds; tests/integration/scripts/test_gpu_checks_smoke.py
runs it):

    python scripts/gpu_checks.py --smoke --out /tmp/gpu-checks

Checks, in order (``--only`` picks some):

``setup``        a random-init Qwen2 model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads /
                 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings) and a byte-level tokenizer,
                 written in Hugging Face format to a temp dir; the other checks load it through the
                 project's own loading code (``common.models``).
``learner``      ``LearnerRank`` with ``learner.fsdp=true learner.mixed_precision=bf16`` in a process group
                 of one (NCCL, TCP init_method) on synthetic trees: tokens/s, peak GPU memory, finite loss
                 and gradient norm, every step taken, matmuls in bf16 (a forward hook), watched weights
                 changed by every step, and a full ``weights_for_sync`` pass (the FSDP2 gather the weight
                 broadcast reads).
``sampling``     ``TreeSampler`` over ``HFBackend`` in bf16, tree then flat mode on the same prompts and
                 seeds with EOS ignored (the analytic case of ``treepo bench sampling``): decoded tokens
                 must equal the analytic count in both modes; reports the wall-clock ratio tree/flat.
``wsync_pack``   ``WeightSender.send`` → ``WeightReceiver.receive`` of the model's tensors (plus odd
                 dtypes and shapes) on CUDA through an in-process loopback standing in for the wire
                 (one GPU cannot hold both ranks of an NCCL group): every tensor bit-exact, with and
                 without a streaming spec; packing GB/s beside one plain device copy of the same bytes.
``wsync_2rank``  sender and receiver as two processes on the one GPU over NCCL, bit-exact. NCCL normally
                 refuses two ranks on one device: then the gloo path from CUDA tensors (what
                 ``sync.backend=gloo`` does on a GPU learner) runs instead, and the check is skipped with
                 NCCL's reason if that passes (failed if not). In ``--smoke`` it is the gloo group.

tests/gpu runs the learner and wsync_pack checks at small sizes under pytest (skipped without CUDA):
``PYTHONPATH=.gpu-vendor:. python3 -m pytest tests/gpu -q`` on the GPU machine.

Every check runs in its own forked process with its own time budget (killed past it); a failure is
recorded and the next check runs. Status per check: ok | failed | timeout | skipped. Exit code 1 when
a check failed or timed out, 2 when none could run (no CUDA), else 0. Results: ``gpu_checks.json`` and ``gpu_checks.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / ".gpu-vendor"
CHECKS = ("setup", "learner", "sampling", "wsync_pack", "wsync_2rank")
HOST = "127.0.0.1"

# Qwen2.5-0.5B's shapes (its config.json), randomly initialised here.
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run, the CPU smoke run and the GPU pytest run."""

    name: str
    model: dict
    model_dtype: str  # dtype the model is saved in (the learner loads float32 master weights)
    # learner: synthetic trees per optimizer step
    prompts: int
    leaves: int
    depth: int
    seg_len: int
    prompt_len: int
    micro_batch_tokens: int
    steps: int  # optimizer steps; the first is warm-up, not timed (>= 2: "a second step moves weights")
    # sampling
    s_prompts: int
    s_w: int
    s_d: int
    s_l: int
    s_b: int
    s_root: int
    s_max_batch: int
    s_dtype: str
    # weight sync
    bucket_mb: float
    pack_repeats: int
    two_rank_layers: int  # decoder layers' worth of tensors sent in the two-process check
    budgets: dict  # seconds per check


SIZES = {
    "gpu": Sizes(
        name="gpu",
        model=QWEN25_05B,
        model_dtype="bfloat16",
        prompts=8,
        leaves=8,
        depth=4,
        seg_len=64,
        prompt_len=64,
        micro_batch_tokens=8192,
        steps=3,
        s_prompts=8,
        s_w=16,
        s_d=4,
        s_l=64,
        s_b=2,
        s_root=2,
        s_max_batch=64,
        s_dtype="bfloat16",
        bucket_mb=64.0,
        pack_repeats=3,
        two_rank_layers=4,
        budgets={"setup": 90, "learner": 150, "sampling": 120, "wsync_pack": 60, "wsync_2rank": 90},
    ),
    "smoke": Sizes(
        name="smoke",
        model=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        model_dtype="float32",
        prompts=2,
        leaves=4,
        depth=2,
        seg_len=8,
        prompt_len=8,
        micro_batch_tokens=64,
        steps=3,
        s_prompts=2,
        s_w=4,
        s_d=2,
        s_l=8,
        s_b=2,
        s_root=2,
        s_max_batch=8,
        s_dtype="float32",
        bucket_mb=0.0625,
        pack_repeats=2,
        two_rank_layers=2,
        budgets={"setup": 60, "learner": 60, "sampling": 60, "wsync_pack": 60, "wsync_2rank": 60},
    ),
    # tests/gpu: small enough for seconds, big enough for several buckets and micro-batches
    "test": Sizes(
        name="test",
        model=dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        model_dtype="bfloat16",
        prompts=4,
        leaves=4,
        depth=2,
        seg_len=16,
        prompt_len=16,
        micro_batch_tokens=256,
        steps=2,
        s_prompts=2,
        s_w=4,
        s_d=2,
        s_l=8,
        s_b=2,
        s_root=2,
        s_max_batch=8,
        s_dtype="bfloat16",
        bucket_mb=1.0,
        pack_repeats=1,
        two_rank_layers=1,
        budgets={},
    ),
}


class Skip(Exception):
    """A check that cannot run here (not a failure)."""


def log(msg: str) -> None:
    print(f"[gpu-checks {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _is_vendor(entry: str) -> bool:
    return bool(entry) and Path(entry).resolve() == VENDOR.resolve()


def use_vendor(enabled: bool = True) -> str:
    """Put the repo and (if built for this Python) ``.gpu-vendor`` first on sys.path, and PYTHONPATH
    alike for the processes started from here; says what it did."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    tags_file = VENDOR / "PYTHON_TAGS"
    tags = tags_file.read_text().split() if tags_file.is_file() else []
    if not enabled:
        state = "disabled (--no-vendor)"
    elif not VENDOR.is_dir():
        state = "absent"
    elif python_tag() not in tags:
        # its regex extension would not load (built per Python version): the installed packages then
        state = f"ignored: built for {' '.join(tags) or 'unknown'} Python, this is {python_tag()}"
    else:
        state = "on sys.path"
    use = state == "on sys.path"
    if use:  # no __pycache__ inside it: the folder travels to the GPU machine at the size it was built
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    # also drop it where PYTHONPATH put it but it must not be used
    sys.path[:] = ([str(VENDOR)] if use else []) + [p for p in sys.path if not _is_vendor(p)]
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _is_vendor(p)]
    os.environ["PYTHONPATH"] = os.pathsep.join(([str(VENDOR)] if use else []) + [str(REPO)] + env)
    return state


def package_report() -> dict[str, str]:
    """Version and origin (vendor / system) of every package these paths import."""
    import importlib

    out = {}
    for mod in (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "numpy",
        "omegaconf",
        "msgpack",
        "yaml",
        "regex",
    ):
        try:
            m = importlib.import_module(mod)
        except Exception as e:  # report, do not fail: the checks that need it will say so
            out[mod] = f"MISSING ({type(e).__name__}: {e})"
            continue
        where = "vendor" if str(VENDOR) in str(getattr(m, "__file__", "")) else "system"
        out[mod] = f"{getattr(m, '__version__', '?')} ({where})"
    return out


def preload() -> str:
    """Import what the checks use (no CUDA touched) so forked checks start warm; '' or the error."""
    try:
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401

        import actors.backends.hf_backend  # noqa: F401
        import actors.sampler  # noqa: F401
        import common.tiny  # noqa: F401
        import common.weight_sync  # noqa: F401
        import learner.rank  # noqa: F401
    except Exception as e:  # each check then fails with its own import error, recorded
        return f"{type(e).__name__}: {e}"
    return ""


def nvidia_smi() -> str:
    """GPU name, memory and driver from nvidia-smi ('' when absent): the parent must not initialise CUDA
    before forking the checks."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def torch_cuda_report() -> dict[str, Any]:
    """What torch sees of the device (initialises CUDA: call in a check process, not the parent)."""
    import torch

    rep: dict[str, Any] = {"cuda_available": torch.cuda.is_available()}
    if rep["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        rep.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            nccl=".".join(str(x) for x in torch.cuda.nccl.version()),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return rep


# --------------------------------------------------------------------------------------------------
# Helpers shared by the checks
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def _peak_memory_gib(gpu: bool) -> dict[str, float]:
    if gpu:
        import torch

        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _qwen2_config(shape: dict, tokenizer=None):
    from transformers import Qwen2Config

    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return Qwen2Config(
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        **ids,
        **shape,
    )


def build_model_dir(out: str | os.PathLike, shape: dict, dtype: str, device: str) -> Path:
    """A random-init Qwen2 of ``shape`` saved in ``dtype`` with a byte-level tokenizer (HF format).

    The tokenizer is the project's byte-level one (260 ids); the model's vocabulary is larger, as in
    real checkpoints whose embedding rows outnumber the tokenizer's ids (ids past it decode to '').
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from common.tiny import build_tokenizer

    hf_logging.disable_progress_bar()
    out = Path(out)
    tokenizer = build_tokenizer(None)
    config = _qwen2_config(shape, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B parameters on the GPU takes a moment, on CPU much longer
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    tmp = out.with_name(out.name + ".partial")  # renamed when complete: a killed build leaves no model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "gpu_checks_model.json").write_text(
        json.dumps({"shape": shape, "dtype": dtype, "params": sum(p.numel() for p in model.parameters())})
    )
    os.rename(tmp, out)
    return out


def _full(t):
    """A parameter's full tensor (FSDP2 parameters are DTensors), detached and cloned."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# --------------------------------------------------------------------------------------------------
# (a) learner: bf16 FSDP2 step through LearnerRank
# --------------------------------------------------------------------------------------------------


def _planned_learner(model_dir, lcfg, algo) -> dict:
    """common/plan.py's learner-rank figures for this check's model and settings (GiB); ``torch_gib``
    leaves out the CUDA context, which torch.cuda.max_memory_allocated does not see."""
    from common.config import ModelConfig, TrainConfig
    from common.plan import GIB, learner_side, model_arch

    cfg = TrainConfig()
    cfg.model, cfg.learner, cfg.algo = ModelConfig(path=str(model_dir), dtype="bfloat16"), lcfg, algo
    arch = model_arch(cfg.model)
    side = learner_side(cfg, arch, arch.params())
    parts = {k: round(v / GIB, 3) for k, v in side.parts.items()}
    return {
        "parts_gib": parts,
        "torch_gib": round(sum(v for k, v in parts.items() if k != "cuda_context"), 3),
    }


def check_learner(model_dir: str | os.PathLike, sz: Sizes, gpu: bool) -> dict:
    """Train ``sz.steps`` optimizer steps on synthetic trees with FSDP2 + bf16 in a group of one."""
    import torch

    from common.config import AlgoConfig, LearnerConfig, ModelConfig
    from learner.advantages import tree_advantages
    from learner.batching import leaf_sequences
    from learner.rank import LearnerRank
    from learner.synthetic import synthetic_trees

    if gpu and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    lcfg = LearnerConfig(
        num_workers=1,
        gpus_per_worker=1 if gpu else 0,
        prompts_per_step=sz.prompts,
        mini_batch_prompts=sz.prompts,
        micro_batch_tokens=sz.micro_batch_tokens,
        fsdp=True,
        mixed_precision="bf16",
        lr=1e-4,
        warmup_steps=1,
    )
    algo = AlgoConfig()
    t0 = time.perf_counter()
    rank = LearnerRank(
        # fp32 master weights (learner.param_dtype), bf16 compute, bf16 to engines (model.dtype)
        ModelConfig(path=str(model_dir), dtype="bfloat16"),
        algo,
        lcfg,
        rank=0,
        world_size=1,
        init_method=f"tcp://{HOST}:{free_port()}",
        timeout_s=120,
    )
    try:
        load_s = time.perf_counter() - t0
        backend = torch.distributed.get_backend()
        params = dict(rank.module.named_parameters())
        layers = rank.module.config.num_hidden_layers
        watch = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{layers - 1}.mlp.down_proj.weight",
            "model.norm.weight",
        ]
        problems: list[str] = []
        sharded = type(params[watch[1]]).__name__
        if sharded != "DTensor":
            problems.append(f"{watch[1]} is a {sharded}, not an FSDP2 DTensor: the model was not sharded")
        mp_policy = None
        with contextlib.suppress(AttributeError):  # FSDP2's private state: reported when readable
            mp_policy = str(rank.module._get_fsdp_state()._mp_policy.param_dtype)
        # the dtype matmuls actually run in: bf16 when the mixed-precision policy is applied
        compute_dtypes: set[str] = set()
        hook = rank.module.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda _m, _i, out: compute_dtypes.add(str(out.dtype))
        )
        before = {n: _full(params[n]) for n in watch}
        vocab = int(rank.module.config.vocab_size)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        steps = []
        timed_tokens, timed_seq_tokens, timed_s = 0, 0, 0.0
        for step in range(sz.steps):
            trees = synthetic_trees(
                sz.prompts,
                w=sz.leaves,
                depth=sz.depth,
                seg_len=sz.seg_len,
                prompt_len=sz.prompt_len,
                vocab_size=vocab,
                seed=step,
            )
            seqs = leaf_sequences(trees, tree_advantages(trees, algo))
            tokens = sum(s.response_len for s in seqs)
            seq_tokens = sum(len(s.token_ids) for s in seqs)
            _sync(gpu)
            ts = time.perf_counter()
            rank.train_on([seqs])
            _sync(gpu)
            dt = time.perf_counter() - ts
            after = {n: _full(params[n]) for n in watch}
            moved = {n: float((after[n].float() - before[n].float()).abs().max()) for n in watch}
            finite = all(bool(torch.isfinite(t).all()) for t in after.values())
            info = dict(rank.last_step)
            info.update(
                step=step,
                seconds=round(dt, 3),
                response_tokens=tokens,
                sequence_tokens=seq_tokens,
                sequences=len(seqs),
                version=rank.version,
                max_abs_weight_change={n: f"{v:.3g}" for n, v in moved.items()},
            )
            steps.append(info)
            log(
                f"learner: step {step + 1}/{sz.steps} loss {info['learner/loss']:.4f} grad norm "
                f"{info['learner/grad_norm']:.3f} {dt:.2f} s ({tokens} response tokens)"
            )
            if not (math.isfinite(info["learner/loss"]) and math.isfinite(info["learner/grad_norm"])):
                problems.append(f"step {step}: loss/grad norm not finite")
            if rank.version != step + 1:
                problems.append(
                    f"step {step}: refused (version {rank.version}, skipped {rank.skipped_steps})"
                )
            if not finite:
                problems.append(f"step {step}: non-finite weights")
            unchanged = [n for n, v in moved.items() if v == 0.0]
            if unchanged:
                problems.append(f"step {step}: weights did not change: {unchanged}")
            if step > 0:  # the first step pays for allocator warm-up and kernel selection
                timed_tokens += tokens
                timed_seq_tokens += seq_tokens
                timed_s += dt
            before = after
        hook.remove()
        if compute_dtypes != {"torch.bfloat16"}:
            problems.append(f"decoder matmuls ran in {sorted(compute_dtypes)}, not bf16 only")
        mem = _peak_memory_gib(gpu)
        # the full-weight gather the weight broadcast reads (collective under FSDP2)
        _sync(gpu)
        ts = time.perf_counter()
        n_sync, sync_bytes, names, dtypes = 0, 0, set(), set()
        for name, t in rank.weights_for_sync():
            n_sync += 1
            sync_bytes += t.numel() * t.element_size()
            names.add(name)
            dtypes.add(str(t.dtype))
        _sync(gpu)
        gather_s = time.perf_counter() - ts
        if "lm_head.weight" not in names:
            problems.append("weights_for_sync does not name lm_head.weight (tied head would go stale)")
        master_dtypes = sorted({str(p.dtype) for p in params.values()})
        if master_dtypes != ["torch.float32"] or dtypes != {"torch.bfloat16"}:
            problems.append(f"master weights {master_dtypes}, sent {sorted(dtypes)}: want float32 / bfloat16")
        planned = _planned_learner(model_dir, lcfg, algo)
        if gpu and mem["peak_allocated_gib"] > 1.25 * planned["torch_gib"]:
            problems.append(
                f"peak allocated {mem['peak_allocated_gib']} GiB is over 1.25x the plan's {planned['torch_gib']:.2f} GiB"
            )
        n_params = sum(p.numel() for p in params.values())
        tokens_per_s = timed_tokens / timed_s if timed_s else float("nan")
        details = {
            "process_group": backend,
            "device": str(rank.device),
            "params": n_params,
            "param_type": sharded,
            "mp_param_dtype": mp_policy,
            "compute_dtypes": sorted(compute_dtypes),
            "load_and_shard_s": round(load_s, 2),
            "response_tokens_per_step": steps[-1]["response_tokens"],
            "micro_batch_tokens": sz.micro_batch_tokens,
            "steps": steps,
            # response tokens per second; a step is the prox forward, forward/backward and the optimizer
            "tokens_per_s": round(tokens_per_s, 1),
            "sequence_tokens_per_s": round(timed_seq_tokens / timed_s, 1) if timed_s else float("nan"),
            "master_dtypes": master_dtypes,
            "plan": planned,
            "weights_for_sync": {
                "tensors": n_sync,
                "gib": round(sync_bytes / 2**30, 3),
                "dtypes": sorted(dtypes),
                "seconds": round(gather_s, 3),
            },
            **mem,
        }
        peak = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))
        details["summary"] = (
            f"{tokens_per_s:.0f} response tok/s, peak {peak} GiB, loss {steps[-1]['learner/loss']:.4f}, "
            f"{sz.steps} steps moved weights"
        )
        details["problems"] = problems
        return details
    finally:
        rank.close()


# --------------------------------------------------------------------------------------------------
# (b) sampling: tree vs flat with the transformers backend
# --------------------------------------------------------------------------------------------------


def check_sampling(model_dir: str | os.PathLike, sz: Sizes, gpu: bool) -> dict:
    """Tree then flat sampling of the same prompts (EOS ignored); decoded tokens vs the analytic count."""
    import torch

    from actors.backends import make_backend
    from actors.sampler import TreeSampler, analytic_decoded_tokens
    from common.config import GeneratorConfig, SamplingConfig, TreeConfig
    from common.models import load_tokenizer
    from common.sampling_metrics import SamplingStats
    from common.tasks import generate

    if gpu and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    model_dir = str(model_dir)
    tok = load_tokenizer(model_dir)
    rows = generate("arith", 2 * sz.s_prompts, seed=0, split="eval")
    encoded = [(r["id"], tok.encode(r["prompt"], add_special_tokens=False)) for r in rows]
    warm, prompts = encoded[: sz.s_prompts], encoded[sz.s_prompts :]
    sampling = SamplingConfig()
    t0 = time.perf_counter()
    backend = make_backend(
        "hf",
        model_dir,
        GeneratorConfig(backend="hf"),
        sampling,
        dtype=sz.s_dtype,
        eos_ids=[],  # EOS ignored: every path runs to Lmax, the analytic case
        seed=0,
        device="cuda" if gpu else "cpu",
        max_batch=sz.s_max_batch,
    )
    load_s = time.perf_counter() - t0
    lmax = sz.s_d * sz.s_l
    base = dict(
        w=sz.s_w,
        d=sz.s_d,
        l=sz.s_l,
        b=sz.s_b,
        max_response_tokens=lmax,
        seed=0,
        root_divergence_min=sz.s_root,
        root_divergence_max=sz.s_root,
        repetition_check=False,
    )

    def decode(ids):
        return tok.decode(ids)

    def run(cfg: TreeConfig, batch) -> tuple[dict, list]:
        stats = SamplingStats()
        sampler = TreeSampler(backend, cfg, sampling, [], decode, stats=stats, require_eos=False)
        _sync(gpu)
        ts = time.perf_counter()
        trees = list(sampler.run(batch, max_in_flight=len(batch)))
        _sync(gpu)
        wall = time.perf_counter() - ts
        out = stats.as_dict(wall_s=wall)
        out["wall_s"] = round(wall, 3)
        return out, trees

    try:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        short = dict(base, l=min(8, sz.s_l), max_response_tokens=sz.s_d * min(8, sz.s_l))
        for mode in ("flat", "tree"):  # warm-up (kernels, allocator), not timed
            run(TreeConfig(mode=mode, **short), warm)
        results, problems = {}, []
        for mode in ("tree", "flat"):
            res, trees = run(TreeConfig(mode=mode, **base), prompts)
            want = 0
            prompt_len = {pid: len(p) for pid, p in prompts}
            if sorted(t.prompt_id for t in trees) != sorted(prompt_len):
                problems.append(f"{mode}: {len(trees)} trees for {len(prompts)} prompts")
            for tree in trees:  # in the order they finished
                t_tok, f_tok = analytic_decoded_tokens(
                    sz.s_w,
                    sz.s_d,
                    sz.s_l,
                    sz.s_b,
                    sz.s_root,
                    lmax,
                    prompt_len[tree.prompt_id],
                    backend.block_size,
                    True,
                )
                want += t_tok if mode == "tree" else f_tok
                if len(tree.leaves) != sz.s_w:
                    problems.append(
                        f"{mode}: tree {tree.tree_id} has {len(tree.leaves)} leaves, not {sz.s_w}"
                    )
                short_leaves = [leaf.length for leaf in tree.leaves if leaf.length != lmax]
                if short_leaves:
                    problems.append(
                        f"{mode}: tree {tree.tree_id} has leaves shorter than Lmax: {short_leaves}"
                    )
            got = int(res["rollout/decoded_tokens"])
            if got != want:
                problems.append(f"{mode}: decoded {got} tokens, the analytic count is {want}")
            res["analytic_decoded_tokens"] = want
            results[mode] = res
            log(
                f"sampling: {mode} {res['wall_s']:.2f} s, {got} decoded tokens, "
                f"{res['rollout/trajectories_per_s']:.1f} trajectories/s"
            )
        tree, flat = results["tree"], results["flat"]
        wall_ratio = tree["wall_s"] / flat["wall_s"]
        decoded_ratio = tree["rollout/decoded_tokens"] / flat["rollout/decoded_tokens"]
        analytic_ratio = tree["analytic_decoded_tokens"] / flat["analytic_decoded_tokens"]
        keys = (
            "wall_s",
            "rollout/decoded_tokens",
            "analytic_decoded_tokens",
            "rollout/steps",
            "rollout/requests",
            "rollout/max_batch",
            "rollout/trajectories_per_s",
            "rollout/decoded_tokens_per_s",
            "rollout/prefill_tokens_computed",
        )
        details = {
            "backend": "hf",
            "dtype": sz.s_dtype,
            "load_s": round(load_s, 2),
            "config": {
                "prompts": sz.s_prompts,
                "w": sz.s_w,
                "d": sz.s_d,
                "l": sz.s_l,
                "b": sz.s_b,
                "root_divergence": sz.s_root,
                "max_batch": sz.s_max_batch,
            },
            "tree": {k: tree[k] for k in keys},
            "flat": {k: flat[k] for k in keys},
            "wall_tree_over_flat": round(wall_ratio, 3),
            "decoded_tree_over_flat": round(decoded_ratio, 3),
            "analytic_tree_over_flat": round(analytic_ratio, 3),
            **_peak_memory_gib(gpu),
        }
        details["summary"] = (
            f"wall tree/flat {wall_ratio:.3f} (decoded tokens {decoded_ratio:.3f}, analytic "
            f"{analytic_ratio:.3f}); tree {tree['wall_s']:.1f} s, flat {flat['wall_s']:.1f} s"
        )
        details["problems"] = problems
        return details
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------------
# (c) weight sync: bucketed packing and the round trip on CUDA tensors
# --------------------------------------------------------------------------------------------------


class _Done:
    def wait(self, timeout=None) -> bool:
        return True


class _LoopbackEnd:
    """One end of an in-process two-rank weight-sync channel (:class:`common.weight_sync.transport.Channel`)
    with only ``broadcast``: the root's broadcasts are queued (cloned, since the sender reuses its staging
    buffers) and the other end's broadcasts take them in order. It stands in for the wire alone; packing
    and unpacking are the real code."""

    def __init__(self, queue: deque, root: bool, keep: bool = True) -> None:
        self.queue, self.root, self.keep = queue, root, keep

    def broadcast(self, t):
        if self.root:
            if self.keep:
                self.queue.append(t.clone())
        else:
            src = self.queue.popleft()
            if src.numel() != t.numel() or src.dtype != t.dtype:
                raise RuntimeError(
                    f"loopback: receiver posted {t.dtype} x {t.numel()}, sender sent {src.dtype} x {src.numel()}"
                )
            t.copy_(src)
        return _Done()

    def drop(self) -> None:
        """Nothing to release: no real group was built."""


def named_model_tensors(shape: dict, device: str, dtype, seed: int = 0) -> dict:
    """Random tensors named and shaped like a Qwen2 model's ``weights_for_sync`` (the tied lm_head is the
    embedding tensor itself, as it is there); the model is built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        meta = Qwen2ForCausalLM(_qwen2_config(shape))
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict = {}
    by_param: dict[int, Any] = {}
    for name, p in meta.named_parameters(remove_duplicate=False):
        if id(p) not in by_param:
            by_param[id(p)] = torch.randn(tuple(p.shape), generator=g, device=device, dtype=torch.float32).to(
                dtype
            )
        out[name] = by_param[id(p)]
    return out


def odd_tensors(device: str, seed: int = 1) -> dict:
    """Dtypes and shapes that stress packing: fp16, int64, bool, a scalar, an empty and a transposed one."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "odd.half": torch.randn(3, 5, 7, generator=g, device=device).half(),
        "odd.ids": torch.randint(-(2**40), 2**40, (19,), generator=g, device=device),
        "odd.mask": torch.rand(23, generator=g, device=device) > 0.5,
        "odd.scalar": torch.tensor(1.25, device=device),
        "odd.empty": torch.zeros(0, 5, device=device),
        "odd.transposed": torch.randn(13, 7, generator=g, device=device).t(),
        # larger than the smoke run's 64 KiB bucket and not contiguous: travels alone, copied
        "odd.big_transposed": torch.randn(300, 100, generator=g, device=device).t(),
        "odd.fp32": torch.randn(33, generator=g, device=device),
    }


def _bytes_of(t):
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def check_wsync_pack(shape: dict, sz: Sizes, gpu: bool) -> dict:
    """Round trip through the real sender and receiver over a loopback, bit-exact; packing GB/s."""
    import torch

    from common.weight_sync import WeightReceiver, WeightSender, plan_buckets

    if gpu and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    named = named_model_tensors(shape, device, dtype)
    named.update(odd_tensors(device))
    backend = "nccl" if gpu else "gloo"
    sender = WeightSender(HOST, 0, world_size=2, backend=backend, bucket_mb=sz.bucket_mb, timeout_s=30)
    receiver = WeightReceiver(HOST, sender.port, rank=1, world_size=2, backend=backend, timeout_s=30)
    queue: deque = deque()
    sender.channel, receiver.channel = _LoopbackEnd(queue, root=True), _LoopbackEnd(queue, root=False)
    sender.device = receiver.device = torch.device(device)
    problems: list[str] = []
    try:
        # 1. packing throughput: the wire discards (nothing queued), best of a few sends
        sender.channel.keep = False
        best = math.inf
        stats = None
        for rep in range(sz.pack_repeats):
            _sync(gpu)
            ts = time.perf_counter()
            stats = sender.send(named.items(), version=rep)
            _sync(gpu)
            best = min(best, time.perf_counter() - ts)
        assert stats is not None
        total = stats.bytes
        flat_src = torch.empty(total, dtype=torch.uint8, device=device)
        flat_dst = torch.empty_like(flat_src)
        raw = math.inf
        for _ in range(max(2, sz.pack_repeats)):
            _sync(gpu)
            ts = time.perf_counter()
            flat_dst.copy_(flat_src)
            _sync(gpu)
            raw = min(raw, time.perf_counter() - ts)
        del flat_src, flat_dst
        pack_gbps, raw_gbps = total / best / 1e9, total / raw / 1e9
        log(
            f"wsync_pack: {stats.params} tensors, {total / 2**30:.3f} GiB in {stats.buckets} buckets: "
            f"send (pack) {pack_gbps:.1f} GB/s, one plain copy {raw_gbps:.1f} GB/s"
        )
        # 2. round trips, bit-exact: listed (no spec) and streamed against a spec
        sender.channel.keep = True
        spec = [(n, t.dtype, tuple(t.shape)) for n, t in named.items()]
        for label, version, kwargs in (
            ("listed", 7, {}),
            ("streamed", 8, {"spec": spec}),
        ):
            items = iter(list(named.items()))
            sent = sender.send(items, version=version, **kwargs)
            got_version, stream = receiver.receive()
            seen = []
            for name, t in stream:
                seen.append(name)
                want = named[name]
                if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                    problems.append(f"{label}: {name} came back {t.dtype} {tuple(t.shape)}")
                elif t.device.type != torch.device(device).type:
                    problems.append(f"{label}: {name} came back on {t.device}")
                elif not torch.equal(_bytes_of(t), _bytes_of(want)):
                    problems.append(f"{label}: {name} differs (not bit-exact)")
            if seen != list(named):
                problems.append(
                    f"{label}: received {len(seen)} tensors in another order than the {len(named)} sent"
                )
            if got_version != version:
                problems.append(f"{label}: version {got_version}, sent {version}")
            if queue:
                problems.append(f"{label}: {len(queue)} broadcasts left unconsumed")
            log(f"wsync_pack: round trip ({label}) of {sent.params} tensors: {len(problems)} problems")
        meta = plan_buckets(spec, sender.bucket_bytes, 0)
        per_bucket = Counter(p.bucket for p in meta.params)
        # a bucket of one contiguous tensor goes out as the tensor itself, with no packing copy
        zero_copy = sum(meta.bucket_nbytes[b] for b, n in per_bucket.items() if n == 1)
        details = {
            "device": device,
            "dtype": str(dtype),
            "tensors": stats.params,
            "zero_copy_bytes": zero_copy,
            "bytes": total,
            "buckets": stats.buckets,
            "bucket_mb": sz.bucket_mb,
            "send_gbps": round(pack_gbps, 2),
            "plain_copy_gbps": round(raw_gbps, 2),
            "send_over_plain_copy": round(pack_gbps / raw_gbps, 3),
            "summary": (
                f"bit-exact x2; send {pack_gbps:.1f} GB/s vs plain copy {raw_gbps:.1f} GB/s "
                f"({total / 2**30:.2f} GiB, {stats.buckets} buckets of {sz.bucket_mb:g} MiB)"
            ),
            "problems": problems,
        }
        return details
    finally:
        sender.channel = receiver.channel = None  # nothing to abort: no real group was built
        sender.close()
        receiver.close()


# ---------------------------------------------------------------- two processes, one device


def _digest(t) -> str:
    import hashlib

    return hashlib.sha256(_bytes_of(t).cpu().numpy().tobytes()).hexdigest()


def _two_rank_tensors(sz: Sizes, device: str):
    import torch

    shape = dict(sz.model, num_hidden_layers=sz.two_rank_layers)
    named = named_model_tensors(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    named.update(odd_tensors(device))
    return named


def _sender_main(
    info_path: str, out_path: str, sz: Sizes, backend: str, device: str, timeout_s: float
) -> None:
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    import torch

    from common.weight_sync import WeightSender

    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        named = _two_rank_tensors(sz, device)
        sender = WeightSender(HOST, 0, 2, backend=backend, timeout_s=timeout_s, bucket_mb=sz.bucket_mb)
        Path(info_path + ".tmp").write_text(json.dumps(sender.info.to_dict()))
        os.replace(info_path + ".tmp", info_path)
        stats = sender.send(named.items(), version=3)
        sender.barrier()
        result = {
            "ok": True,
            "digests": [[n, _digest(t)] for n, t in named.items()],
            "gbps": stats.gbps,
            "bytes": stats.bytes,
            "buckets": stats.buckets,
            "seconds": stats.seconds,
        }
        sender.close()
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    Path(out_path).write_text(json.dumps(result))


def _receiver_main(info_path: str, out_path: str, sender_out: str, device: str, timeout_s: float) -> None:
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    import torch

    from common.weight_sync import WeightReceiver

    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(info_path):
            if os.path.exists(sender_out):
                raise RuntimeError("the sender ended before publishing its group info")
            if time.monotonic() > deadline:
                raise TimeoutError("the sender never published its group info")
            time.sleep(0.05)
        receiver = WeightReceiver.from_info(json.loads(Path(info_path).read_text()), 1, timeout_s=timeout_s)
        version, stream = receiver.receive()
        digests = [[n, _digest(t)] for n, t in stream]
        receiver.barrier()
        st = receiver.last_stats
        result = {
            "ok": True,
            "version": version,
            "digests": digests,
            "device": str(receiver.device),
            "gbps": st.gbps if st else None,
        }
        receiver.close()
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    Path(out_path).write_text(json.dumps(result))


def _two_rank_run(sz: Sizes, backend: str, device: str, workdir: Path, timeout_s: float) -> dict:
    """Sender (tensors on ``device``) and receiver as two forked processes; both results, or an error."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    tag = f"{backend}-{device}"
    info, s_out, r_out = (str(workdir / f"2rank-{tag}-{x}.json") for x in ("info", "sender", "receiver"))
    for p in (info, s_out, r_out):
        Path(p).unlink(missing_ok=True)
    procs = [
        ctx.Process(target=_sender_main, args=(info, s_out, sz, backend, device, timeout_s)),
        ctx.Process(target=_receiver_main, args=(info, r_out, s_out, device, timeout_s)),
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 2 * timeout_s + 30
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    out = {}
    for role, path, p in (("sender", s_out, procs[0]), ("receiver", r_out, procs[1])):
        if os.path.exists(path):
            out[role] = json.loads(Path(path).read_text())
        else:
            out[role] = {"ok": False, "error": f"process ended (exit code {p.exitcode}) without a result"}
    return out


def _compare_two_rank(res: dict, label: str) -> list[str]:
    s, r = res["sender"], res["receiver"]
    if not (s["ok"] and r["ok"]):
        errs = [f"{role}: {res[role]['error']}" for role in ("sender", "receiver") if not res[role]["ok"]]
        return [f"{label}: " + "; ".join(errs)]
    problems = []
    if r["version"] != 3:
        problems.append(f"{label}: received version {r['version']}, sent 3")
    if r["digests"] != s["digests"]:
        bad = [a[0] for a, b in zip(s["digests"], r["digests"]) if a != b]
        problems.append(f"{label}: {len(bad)} tensors differ (or order/count differs): {bad[:3]}")
    return problems


def _nccl_refused(res: dict) -> str:
    """NCCL's refusal of two ranks on one GPU, if that is what failed ('' otherwise)."""
    text = " ".join(res[r].get("error", "") + res[r].get("trace", "") for r in ("sender", "receiver"))
    low = text.lower()
    for needle in ("duplicate gpu", "invalid usage", "ncclinvalidusage"):
        if needle in low:
            return needle
    return ""


def check_wsync_2rank(sz: Sizes, gpu: bool, workdir: Path) -> dict:
    """The real two-rank group: NCCL on one GPU if NCCL allows it (else skipped, gloo from CUDA tensors
    instead), gloo in the smoke run."""
    if not gpu:
        res = _two_rank_run(sz, "gloo", "cpu", workdir, timeout_s=30)
        problems = _compare_two_rank(res, "gloo")
        s = res["sender"]
        details = {"backend": "gloo", "device": "cpu", "problems": problems}
        if s["ok"]:
            details.update(bytes=s["bytes"], buckets=s["buckets"], sender_gbps=round(s["gbps"], 3))
            details["summary"] = f"gloo bit-exact, {s['gbps']:.2f} GB/s ({s['bytes'] / 2**20:.1f} MiB)"
        return details
    import torch

    # this process forks the two ranks, which must be able to initialise CUDA: with
    # PYTORCH_NVML_BASED_CUDA_CHECK=1 (set by main) this asks NVML, not the CUDA runtime
    if not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    res = _two_rank_run(sz, "nccl", "cuda", workdir, timeout_s=20)
    problems = _compare_two_rank(res, "nccl")
    s = res["sender"]
    if not problems:
        return {
            "backend": "nccl",
            "bytes": s["bytes"],
            "buckets": s["buckets"],
            "sender_gbps": round(s["gbps"], 2),
            "summary": f"NCCL on one GPU bit-exact, {s['gbps']:.1f} GB/s ({s['bytes'] / 2**30:.2f} GiB)",
            "problems": [],
        }
    refused = _nccl_refused(res)
    if not refused:
        return {"backend": "nccl", "problems": problems}
    log(f"wsync_2rank: NCCL refused two ranks on one GPU ({refused}); trying gloo from CUDA tensors")
    fb = _two_rank_run(sz, "gloo", "cuda", workdir, timeout_s=30)
    fb_problems = _compare_two_rank(fb, "gloo from CUDA tensors")
    nccl_note = f"NCCL refused two ranks on one GPU ('{refused}': {problems[0][:300]})"
    if fb_problems:  # the gloo path from GPU tensors (sync.backend=gloo on a GPU learner) is broken
        return {"backend": "gloo (NCCL refused)", "nccl": nccl_note, "problems": fb_problems}
    fb_s = fb["sender"]
    raise Skip(
        f"{nccl_note}; instead gloo from CUDA tensors: bit-exact, {fb_s['gbps']:.2f} GB/s "
        f"({fb_s['bytes'] / 2**30:.2f} GiB)"
    )


# --------------------------------------------------------------------------------------------------
# Runner: one forked process per check, each with its own budget
# --------------------------------------------------------------------------------------------------


def _run_check(name: str, sz: Sizes, gpu: bool, workdir: Path) -> dict:
    """In the check's process: run it, return {status, details|reason}."""
    import torch

    torch.set_num_threads(1 if not gpu else min(8, os.cpu_count() or 1))
    model_dir = workdir / "model"
    if name == "setup":
        env = torch_cuda_report() if gpu else {"cuda_available": False}
        if gpu and not env["cuda_available"]:
            raise Skip("CUDA is not available (torch.cuda.is_available() is False)")
        t0 = time.perf_counter()
        build_model_dir(model_dir, sz.model, sz.model_dtype, "cuda" if gpu else "cpu")
        info = json.loads((model_dir / "gpu_checks_model.json").read_text())
        size_gib = sum(f.stat().st_size for f in model_dir.iterdir()) / 2**30
        return {
            "torch": env,
            "model_dir": str(model_dir),
            "params": info["params"],
            "saved_dtype": sz.model_dtype,
            "saved_gib": round(size_gib, 3),
            "build_s": round(time.perf_counter() - t0, 2),
            "summary": f"{info['params'] / 1e6:.1f} M params saved in {sz.model_dtype} ({size_gib:.2f} GiB)",
            "problems": [],
        }
    if name in ("learner", "sampling") and not (model_dir / "config.json").is_file():
        raise Skip("no model: the setup check did not finish")
    if name == "learner":
        return check_learner(model_dir, sz, gpu)
    if name == "sampling":
        return check_sampling(model_dir, sz, gpu)
    if name == "wsync_pack":
        return check_wsync_pack(sz.model, sz, gpu)
    if name == "wsync_2rank":
        return check_wsync_2rank(sz, gpu, workdir)
    raise ValueError(f"unknown check {name!r}")


def _child(name: str, sz: Sizes, gpu: bool, workdir: str, result_path: str) -> None:
    os.setsid()  # its own process group: a timeout kills the check and whatever it started
    try:
        details = _run_check(name, sz, gpu, Path(workdir))
        problems = details.get("problems", [])
        out = {"status": "failed" if problems else "ok", "details": details}
        if problems:
            out["reason"] = "; ".join(problems)[:2000]
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except BaseException as e:  # recorded; the runner goes on with the next check
        out = {
            "status": "failed",
            "reason": f"{type(e).__name__}: {e}"[:2000],
            "trace": traceback.format_exc()[-4000:],
        }
    Path(result_path).write_text(json.dumps(out, default=str))


def run_checks(names: list[str], sz: Sizes, gpu: bool, workdir: Path, max_total_s: float) -> dict:
    import multiprocessing as mp

    import torch

    # Forked checks share the imports already done here; that is safe while this process has not
    # initialised CUDA (it never does itself; spawn is the fallback should an import have done it).
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    results: dict[str, dict] = {}
    t_start = time.monotonic()
    for name in names:
        budget = float(sz.budgets.get(name, 120))
        left = max_total_s - (time.monotonic() - t_start)
        if left < 5:
            results[name] = {"status": "skipped", "reason": "out of total time", "seconds": 0.0}
            log(f"{name}: skipped (out of total time)")
            continue
        budget = min(budget, left)
        log(f"{name}: start (budget {budget:.0f} s)")
        result_path = workdir / f"result-{name}.json"
        t0 = time.monotonic()
        p = ctx.Process(target=_child, args=(name, sz, gpu, str(workdir), str(result_path)), name=name)
        p.start()
        p.join(budget)
        timed_out = p.is_alive()
        if timed_out:
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.killpg(p.pid, signal.SIGKILL)
            p.join()
        seconds = time.monotonic() - t0
        if timed_out:
            res = {"status": "timeout", "reason": f"killed after its budget of {budget:.0f} s"}
        elif result_path.is_file():
            res = json.loads(result_path.read_text())
        else:
            res = {
                "status": "failed",
                "reason": f"check process died (exit code {p.exitcode}) without a result",
            }
        res["seconds"] = round(seconds, 2)
        res["budget_s"] = round(budget)
        results[name] = res
        line = res.get("details", {}).get("summary") or res.get("reason", "")
        log(f"{name}: {res['status'].upper()} in {seconds:.1f} s: {line}")
        if res["status"] == "failed" and "trace" in res:
            print(res["trace"], file=sys.stderr, flush=True)
    return results


def markdown_table(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# GPU checks ({report['mode']})",
        "",
        f"- when: {report['started']}  total {report['total_s']:.1f} s",
        f"- python {env['python']}, torch {env['torch']}, CUDA {env['torch_cuda']}, GPU: {env.get('gpu') or '-'}",
        f"- vendor: {env['vendor']}",
        "",
        "| check | status | seconds | budget s | result |",
        "|---|---|---:|---:|---|",
    ]
    for name, r in report["checks"].items():
        text = r.get("details", {}).get("summary") or r.get("reason", "")
        if r["status"] == "failed" and r.get("details", {}).get("summary"):
            text = r["reason"]
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} | {r.get('budget_s', '')} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="", help="Directory for gpu_checks.json and gpu_checks.md.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on CPU (gloo), same code paths.")
    parser.add_argument("--only", default="", help=f"Comma-separated subset of: {', '.join(CHECKS)}.")
    parser.add_argument(
        "--max-total-s", type=float, default=0.0, help="Overall time limit (default 450 on GPU, 170 smoke)."
    )
    parser.add_argument("--no-vendor", action="store_true", help="Do not put .gpu-vendor on sys.path.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (model, results).")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}: choose from {', '.join(CHECKS)}")
    if any(n in ("learner", "sampling") for n in names) and "setup" not in names:
        names.insert(0, "setup")  # they need its model
    gpu = not args.smoke
    sz = SIZES["gpu" if gpu else "smoke"]
    max_total = args.max_total_s or (450.0 if gpu else 170.0)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a hub lookup fails at once
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not gpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch.cuda.is_available() through NVML, not the CUDA runtime: a runtime call here would leave the
    # forked checks unable to initialise CUDA
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    vendor = use_vendor(not args.no_vendor)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.monotonic()
    # Import once here so that the forked checks share it; nothing here touches CUDA.
    packages = package_report()
    preload_error = preload()
    import torch

    env = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": nvidia_smi(),
        "cpu_count": os.cpu_count(),
        "vendor": vendor,
        "packages": packages,
        "preload_error": preload_error,
    }
    log(f"python {env['python']} torch {env['torch']} (CUDA {env['torch_cuda']}); vendor: {vendor}")
    log(f"GPU: {env['gpu'] or 'none seen by nvidia-smi'}")
    log("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    log(f"mode {'gpu' if gpu else 'smoke'}: checks {', '.join(names)}; total limit {max_total:.0f} s")

    workdir = Path(tempfile.mkdtemp(prefix="treepo-gpu-checks-"))
    try:
        checks = run_checks(names, sz, gpu, workdir, max_total)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    setup_env = checks.get("setup", {}).get("details", {}).get("torch")
    if setup_env:
        env["torch_device"] = setup_env
    report = {
        "mode": "gpu" if gpu else "smoke",
        "started": started,
        "total_s": round(time.monotonic() - t0, 1),
        "sizes": dataclasses.asdict(sz),
        "env": env,
        "checks": checks,
    }
    text = json.dumps(report, indent=1, default=str)
    table = markdown_table(report)
    print(text, flush=True)
    print("\n" + table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_checks.json").write_text(text + "\n")
        (out / "gpu_checks.md").write_text(table)
    if any(r["status"] in ("failed", "timeout") for r in checks.values()):
        return 1
    return 0 if any(r["status"] == "ok" for r in checks.values()) else 2  # 2: nothing could run here


if __name__ == "__main__":
    sys.exit(main())
