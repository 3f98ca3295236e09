"""One learner rank: the policy model, its optimizer, and PPO updates on leaf sequences.

A plain class (``cluster/`` wraps it in Ray). Ranks of a group join a torch.distributed process group
(gloo on CPU, NCCL on GPU) given explicitly (``init_method`` tcp://host:port, rank, world size).
On CPU the model is wrapped in DDP; on GPU with ``learner.fsdp`` every decoder layer and then the
root are sharded with FSDP2 (``fully_shard``), with a bf16 ``MixedPrecisionPolicy`` (fp32 gradient
reduction) when ``learner.mixed_precision=bf16``. A group of one without ``init_method`` runs with
no process group at all.

Gradient accumulation equals one big batch: the loss of every micro-batch is its sum over valid
tokens divided by the mini-batch's GLOBAL valid-token count (all ranks), times the world size because
DDP/FSDP average gradients over ranks. DDP synchronises gradients on the last micro-batch only; FSDP2
reduce-scatters them after every micro-batch (``learner.grad_sync=every_micro_batch``: the gradient
stays sharded) or on the last one (``last_micro_batch``: less communication, an unsharded fp32
gradient of the whole model on every rank until then).

A step whose loss or gradient norm is not finite (on any rank) is refused: the gradients are dropped,
the optimizer, scheduler and policy version do not move, ``skipped_steps`` counts it; since
checkpoints only ever hold optimizer-stepped state, a NaN step is never checkpointed.

The learning rate warms up linearly: step ``s`` (0-based) uses ``lr * min(1, (s + 1) / warmup_steps)``
and stays constant afterwards (the paper's schedule).

accelerate is not used: models are loaded with ``from_pretrained`` on every rank and then wrapped or
sharded; ``init_empty_weights`` would only pay off together with rank-0 loading and broadcast into
sharded parameters, which the model sizes this targets on one node do not need.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from common.config import AlgoConfig, LearnerConfig, ModelConfig
from common.errors import ConfigError, ModelError
from common.metrics import Metric, reduce_metrics
from common.models import load_model, resolve_model, tiny_options
from learner import checkpoint as ckpt
from learner import lora
from learner.batching import LeafSequence, leaf_sequences
from learner.loss import LossParams, policy_loss
from learner.packing import make_packer


def _load_model(model_cfg: ModelConfig, device: torch.device, dtype: str | None = None) -> torch.nn.Module:
    """The model in ``dtype`` (default ``model.dtype``) on ``device``."""
    return load_model(
        model_cfg.path,
        dtype or model_cfg.dtype,
        str(device),
        trust_remote_code=model_cfg.trust_remote_code,
        **tiny_options(model_cfg),
    )


def _device(learner_cfg: LearnerConfig) -> torch.device:
    """This rank's device, made the current one: ``cuda:$LOCAL_RANK`` when the learner has GPUs."""
    if learner_cfg.gpus_per_worker <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "learner.gpus_per_worker > 0 but CUDA is not available: set learner.gpus_per_worker=0"
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def autocast_forward(module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run ``module``'s forward under ``torch.autocast(device_type, dtype)`` (mixed precision without
    FSDP2): matmuls in ``dtype`` on the master weights, which stay in their own dtype for the update."""
    inner = module.forward

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return inner(*args, **kwargs)

    module.forward = forward


def shard_for_rank(items: Sequence, rank: int, world_size: int, mini_batch_prompts: int) -> list:
    """Rank ``rank``'s share of a step's prompts, in the order :meth:`LearnerRank.train_step` expects."""
    if mini_batch_prompts % world_size or len(items) % mini_batch_prompts:
        raise ConfigError(
            f"{len(items)} prompts in mini-batches of {mini_batch_prompts} over {world_size} ranks do not divide "
            "evenly: make prompts_per_step a multiple of mini_batch_prompts, and that a multiple of num_workers"
        )
    per_rank = mini_batch_prompts // world_size
    out: list = []
    for start in range(0, len(items), mini_batch_prompts):
        out.extend(items[start + rank * per_rank : start + (rank + 1) * per_rank])
    return out


class LearnerRank:
    """One data-parallel learner rank. All ranks of a group must make the same calls in the same order."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        algo_cfg: AlgoConfig,
        learner_cfg: LearnerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        seed: int = 0,
        temperature: float = 1.0,
        timeout_s: float = 600.0,
    ) -> None:
        if world_size > 1 and init_method is None:
            raise ConfigError(
                f"world_size={world_size} needs an init_method (tcp://host:port) shared by all ranks"
            )
        self.model_cfg, self.algo, self.cfg = model_cfg, algo_cfg, learner_cfg
        self.rank, self.world_size = rank, world_size
        self.temperature = float(temperature)
        self.loss_params = LossParams.from_algo(algo_cfg)
        self.loss_params.check()
        self.device = _device(learner_cfg)
        self.distributed = init_method is not None
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        torch.manual_seed(seed)
        np.random.seed(seed)

        # master weights (and so the optimizer state) in learner.param_dtype; engines and checkpoint
        # exports get model.dtype; compute in learner.mixed_precision
        self.export_dtype = getattr(torch, model_cfg.dtype)
        self.compute_dtype = torch.bfloat16 if learner_cfg.mixed_precision == "bf16" else None
        module, self.lora = self._load_policy()
        self.module = module  # the HF model (FSDP2 shards it in place; DDP wraps it)
        # learner.packing: how leaf sequences become model inputs, one packer for the rank's life
        pad_id = int(module.config.pad_token_id or 0)
        self.packer = make_packer(learner_cfg.packing, learner_cfg.packed_attention, pad_id)
        self.packer.prepare_model(module)
        self.fsdp = bool(learner_cfg.fsdp)
        self._sync_every_micro_batch = learner_cfg.grad_sync == "every_micro_batch"
        self.model = self._wrap(module)
        # with LoRA the reference policy is the base: the same module with its adapters switched off
        self.has_reference = algo_cfg.kl_coef > 0
        self.ref_model = self._load_reference() if self.has_reference and self.lora is None else None
        self.optimizer, self.scheduler = self._make_optimizer()
        self.version = 0  # policy version: successful optimizer steps
        self.skipped_steps = 0
        self._reset_accumulators()

    # ------------------------------------------------------------------ setup helpers
    def _load_policy(self) -> tuple[torch.nn.Module, Any]:
        """The HF model to train (in learner.param_dtype, training mode) and its LoRA wrapper (None
        without learner.lora): adapters injected into the HF model in place (the PeftModel wrapper
        saves, loads and switches them off); only they train, engines get the merged weights."""
        module = _load_model(self.model_cfg, self.device, self.cfg.param_dtype)
        module.train()
        module.config.use_cache = False
        if self.cfg.activation_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not lora.enabled(self.cfg):
            return module, None
        return module, lora.apply_lora(module, self.cfg.lora, base_path=resolve_model(self.model_cfg))

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The model the updates run: FSDP2-sharded (learner.fsdp), DDP-wrapped (a process group) or
        the module itself; without FSDP, bf16 compute is an autocast forward."""
        if self.compute_dtype is not None and not self.fsdp:
            autocast_forward(module, self.device.type, self.compute_dtype)
        if self.fsdp:
            return self._shard(module)
        if self.distributed:
            gpu = self.device.type == "cuda"
            return DistributedDataParallel(module, device_ids=[self.device.index] if gpu else None)
        return module

    def _load_reference(self) -> torch.nn.Module:
        """A frozen copy of the initial policy (in model.dtype), for the KL term."""
        ref = _load_model(self.model_cfg, self.device).eval().requires_grad_(False)
        self.packer.prepare_model(ref)
        if self.compute_dtype is not None:
            autocast_forward(ref, self.device.type, self.compute_dtype)
        return ref

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the trainable parameters and the linear warm-up schedule."""
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.cfg.lr,
            betas=tuple(float(b) for b in self.cfg.betas),
            weight_decay=self.cfg.weight_decay,
        )
        warmup = max(1, int(self.cfg.warmup_steps))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def _shard(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            raise ConfigError("learner.fsdp=true needs a process group: pass init_method")
        kw: dict[str, Any] = {}
        if self.cfg.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = getattr(getattr(module, "model", None), "layers", None)
        if layers is None:
            raise ModelError(
                f"{type(module).__name__} has no model.layers: FSDP2 wrapping expects a decoder stack"
            )
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(module, **kw)
        return module

    def _reset_accumulators(self) -> None:
        self._loss_sum = 0.0
        self._nonfinite = False

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    # ------------------------------------------------------------------ forward
    def _token_logprobs(
        self, model: torch.nn.Module, batch: dict, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs (and entropies) of the batch's targets, laid out like ``batch["mask"]``: [rows,
        T - 1] for padded rows, [leaves, longest response] for a packed batch (see learner/packing.py)."""
        module = self.ref_model if model is self.ref_model else self.module
        logits = self.packer.forward(model, module, batch, self.device).float()
        if self.temperature != 1.0:  # behavior logprobs were taken after temperature scaling
            logits = logits / self.temperature
        return self.packer.logprobs(logits, batch, entropy)

    def _micro_batches(self, seqs: Sequence[LeafSequence]) -> list[list[int]]:
        groups = self.packer.plan(seqs, self.cfg.micro_batch_tokens)
        if self.fsdp and self.distributed:
            # every FSDP forward/backward is collective: all ranks must run as many micro-batches, so a
            # rank with fewer runs idle ones (an empty list: its first sequence with no loss tokens)
            most = int(self._all_reduce([float(len(groups))], dist.ReduceOp.MAX)[0])
            groups += [[] for _ in range(most - len(groups))]
        return groups

    def _collate(self, seqs: Sequence[LeafSequence], group: list[int]) -> dict:
        chosen = [seqs[i] for i in group] if group else [seqs[0]]
        batch = self.packer.collate(chosen, current_version=self.version)
        if not group:
            batch["mask"].zero_()  # an idle micro-batch: the forward runs, nothing is learned from it
        return batch

    @torch.no_grad()
    def compute_logprobs(self, seqs: Sequence[LeafSequence], reference: bool = False) -> list[np.ndarray]:
        """Response-token logprobs under the current (or reference) policy, one array per sequence."""
        if reference and self.lora is not None:
            with lora.adapters_off(self.lora):
                return self._compute_logprobs(seqs, self.module)
        return self._compute_logprobs(
            seqs, self.ref_model if reference else (self.model if self.fsdp else self.module)
        )

    def _compute_logprobs(self, seqs: Sequence[LeafSequence], model: torch.nn.Module) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(seqs)
        for group in self._micro_batches(seqs):
            batch = self._collate(seqs, group)
            logp, _ = self._token_logprobs(model, batch)
            logp = logp.cpu()
            for row, i in enumerate(group):
                out[i] = self.packer.response_logprobs(logp, row, seqs[i])
        return out  # type: ignore[return-value]

    def prepare(self, seqs: Sequence[LeafSequence]) -> None:
        """Fill π_prox (and reference) logprobs in place, before any update on this data."""
        for s, lp in zip(seqs, self.compute_logprobs(seqs)):
            s.prox_logprobs_R = lp
        if self.has_reference:
            for s, lp in zip(seqs, self.compute_logprobs(seqs, reference=True)):
                s.ref_logprobs_R = lp

    # ------------------------------------------------------------------ update
    def forward_backward(
        self,
        seqs: Sequence[LeafSequence],
        global_tokens: int | None = None,
        *,
        parts: list[dict[str, Metric]] | None = None,
    ) -> dict[str, float]:
        """Accumulate gradients of this rank's share of a mini-batch; call once per mini-batch.

        ``global_tokens``: trained response tokens of the whole mini-batch over all ranks (None: counted
        here with an all-reduce, see :meth:`global_token_count`). Sequences need ``prox_logprobs_R``
        (see :meth:`prepare`). Gradients are synchronised across ranks at the end of the call.
        Returns the micro-batches' metrics combined; ``parts`` also receives them as typed metrics.
        """
        if global_tokens is None:
            global_tokens = self.global_token_count(seqs)
        if not seqs:
            raise ValueError(
                "forward_backward needs at least one sequence on every rank (DDP syncs per rank)"
            )
        if any(s.prox_logprobs_R is None for s in seqs):
            raise ValueError("sequences lack prox_logprobs_R: call prepare(seqs) before the first update")
        groups = self._micro_batches(seqs)
        # DDP/FSDP average gradients over ranks: scale the normaliser so the sum over ranks results
        normaliser = float(global_tokens) / self.world_size
        mine: list[dict[str, Metric]] = []
        for k, group in enumerate(groups):
            last = k == len(groups) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last or self._sync_every_micro_batch)
                sync = contextlib.nullcontext()
            elif self.distributed and not last:
                sync = self.model.no_sync()
            else:
                sync = contextlib.nullcontext()
            batch = self._collate(seqs, group)
            with sync:
                logp, ent = self._token_logprobs(self.model, batch, entropy=True)
                dev = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                loss, metrics = policy_loss(
                    logp,
                    dev["prox_logprobs"],
                    dev["behavior_logprobs"],
                    dev["advantages"],
                    dev["mask"],
                    normaliser,
                    self.loss_params,
                    ref_logprobs_B_T=dev.get("ref_logprobs"),
                    entropy_B_T=ent,
                    staleness_B_T=dev["staleness"],
                )
                loss.backward()
            # model positions run (padding included; each distinct token once when packed)
            metrics["learner/forward_tokens"] = Metric.sum(float(batch["input_ids"].numel()))
            value = float(loss.detach()) / self.world_size  # this rank's share of the global token-mean
            self._loss_sum += value
            self._nonfinite |= not math.isfinite(value)
            mine.append(metrics)
        if parts is not None:
            parts.extend(mine)
        return reduce_metrics(mine)

    def global_token_count(self, seqs: Sequence[LeafSequence]) -> int:
        """Trained response tokens of ``seqs`` over all ranks (observation tokens excluded): the
        token-mean normaliser of :func:`learner.loss.policy_loss`."""
        return int(self._all_reduce([float(sum(s.loss_tokens for s in seqs))])[0])

    def optim_step(self) -> int:
        """Clip and apply the accumulated gradients; returns the policy version (unchanged if refused)."""
        loss_sum, nonfinite = self._all_reduce([self._loss_sum, float(self._nonfinite)])
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        ok = nonfinite == 0 and math.isfinite(loss_sum) and math.isfinite(grad_norm)
        self.last_step = {
            "learner/loss": loss_sum,
            "learner/grad_norm": grad_norm,
            "learner/lr": self.scheduler.get_last_lr()[0],
        }
        if ok:
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        else:
            self.skipped_steps += 1
        self.last_step["learner/skipped_steps"] = float(self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_accumulators()
        return self.version

    def train_on(self, mini_batches: Sequence[Sequence[LeafSequence]]) -> dict[str, float]:
        """π_prox recompute once, then ``ppo_epochs`` passes with one optimizer step per mini-batch.

        Every rank passes the same number of mini-batches (its own share of each).
        """
        self.prepare([s for mb in mini_batches for s in mb])
        parts, steps = [], []
        for _ in range(self.cfg.ppo_epochs):
            for mb in mini_batches:
                total = self.global_token_count(mb)
                self.forward_backward(mb, total, parts=parts)
                self.optim_step()
                steps.append(self.last_step)
        metrics = reduce_metrics(parts)
        metrics.update(
            {k: float(np.mean([s[k] for s in steps])) for k in ("learner/loss", "learner/grad_norm")}
        )
        metrics["learner/lr"] = steps[-1]["learner/lr"]
        metrics["learner/skipped_steps"] = float(self.skipped_steps)
        metrics["learner/version"] = float(self.version)
        return metrics

    def train_step(self, trees: Sequence, advantages_P_L: Sequence[np.ndarray]) -> dict[str, float]:
        """One controller step on this rank's trees (advantages already computed over the whole batch).

        The trees are this rank's share in mini-batch order: consecutive chunks of
        ``mini_batch_prompts / world_size`` trees form its part of mini-batch 1, 2, ... (with a global
        list ``P`` of prompts, rank ``r`` gets ``shard_for_rank(P, r, world, mini_batch_prompts)``).
        """
        per_rank = max(1, self.cfg.mini_batch_prompts // self.world_size)
        mini_batches = [
            leaf_sequences(trees[i : i + per_rank], advantages_P_L[i : i + per_rank])
            for i in range(0, len(trees), per_rank)
        ]
        return self.train_on(mini_batches)

    # ------------------------------------------------------------------ weights and checkpoints
    def weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor in ``model.dtype``) per parameter, in :meth:`weights_spec`'s order,
        one at a time. Every rank must drive the iterator (FSDP gathers are collective); only rank 0's
        tensors are meant to be sent. A sharded parameter is cast shard by shard before it is gathered:
        the gather moves ``model.dtype`` bytes, not the fp32 master's."""
        if self.lora is not None:  # the merged weights under the base names
            yield from lora.merged_weights(self.module, self.export_dtype)
            return
        # remove_duplicate=False: a tied lm_head must be sent too, or the engine keeps its old head
        for name, p in self.module.named_parameters(remove_duplicate=False):
            t = p.detach().to(self.export_dtype)  # a DTensor casts its local shard
            yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t)

    def weights_spec(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) of what :meth:`weights_for_sync` yields, in its order, without
        gathering anything: the weight sender pulls the tensors bucket by bucket against it instead of
        holding the whole model."""
        if self.lora is not None:
            return lora.merged_spec(self.module, self.export_dtype)
        params = self.module.named_parameters(remove_duplicate=False)
        return [(name, self.export_dtype, tuple(p.shape)) for name, p in params]

    @property
    def _sharded_checkpoint(self) -> bool:
        """Master weights and optimizer go to ``sharded/`` (each rank its shard) when FSDP shards them or
        when their dtype differs from the export's (model.dtype); else into model.safetensors/optimizer.pt.
        With LoRA never: the trained state is the adapter (adapter/) and its optimizer.pt."""
        if self.lora is not None:
            return False
        return self.fsdp or self.cfg.param_dtype != self.model_cfg.dtype

    def _checkpoint_states(self, tmp: Path) -> tuple[dict | None, dict | None]:
        """Write the sharded part (collective) and return rank 0's (export state, optimizer state)."""
        if self.lora is not None:  # model.safetensors is the merged model, for engines and evaluation
            merged = lora.merged_state(self.module, self.export_dtype) if self.rank == 0 else None
            return merged, self.optimizer.state_dict()
        if not self._sharded_checkpoint:
            return None, self.optimizer.state_dict()
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        ckpt.write_sharded(tmp, {"model": model_sd, "optim": optim_sd})
        del model_sd, optim_sd
        full = get_model_state_dict(
            self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return (ckpt.export_state(full, self.export_dtype) if self.rank == 0 else None), None

    def save(
        self, root: str | os.PathLike, extra: dict | None = None, step: int | None = None, keep_last: int = 2
    ) -> Path | None:
        """Checkpoint into ``root/ckpt-<step>`` (step defaults to the policy version). Collective."""
        step = self.version if step is None else step
        tmp = ckpt.begin(root, step) if self.rank == 0 else Path(root) / f".tmp-{ckpt.ckpt_name(step)}"
        self.barrier()
        ckpt.write_rng(tmp, self.rank)
        model_state, optim_state = self._checkpoint_states(tmp)
        self.barrier()
        final = None
        if self.rank == 0:
            trainer = {
                "step": step,
                "version": self.version,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world_size,
                "extra": dict(extra or {}),
            }
            src = self.model_cfg.path
            tok_dir = src if Path(src).is_dir() else None
            ckpt.write_state(
                tmp,
                self.module,
                model_state,
                optim_state,
                self.scheduler.state_dict(),
                trainer,
                tok_dir,
                export_dtype=self.model_cfg.dtype,
            )
            if self.lora is not None:
                lora.save_adapter(self.lora, tmp / lora.ADAPTER_DIR)
            final = ckpt.publish(root, tmp, step, keep_last)
        self.barrier()
        return final

    def load(self, root: str | os.PathLike, required: bool = True) -> dict | None:
        """Restore the newest intact checkpoint under ``root``; returns its ``extra`` (None if none)."""
        found = ckpt.require_checkpoint(root) if required else ckpt.find_checkpoint(root)
        if found is None:
            return None
        has_adapter = (found.path / lora.ADAPTER_DIR).is_dir()
        if has_adapter and self.lora is None:
            raise ModelError(
                f"checkpoint {found.path} holds a LoRA adapter (adapter/): resume with the learner.lora.* "
                "it was trained with, or start a full fine-tune from its merged weights (model.path="
                f"{found.path})"
            )
        if self.lora is not None:  # the base is model.path again; the adapter and its optimizer state
            lora.load_adapter(self.lora, found.path / lora.ADAPTER_DIR)
            self.optimizer.load_state_dict(found.optimizer_state())
        elif found.sharded:  # each rank reads its own shards (any world size: DCP reshards)
            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            found.read_sharded(state)
            set_state_dict(
                self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        elif self.fsdp:
            set_state_dict(
                self.module,
                self.optimizer,
                model_state_dict=found.model_state(),
                optim_state_dict=found.optimizer_state(),
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
        else:
            state = found.model_state()
            missing, unexpected = self.module.load_state_dict(state, strict=False)
            tied = set(getattr(self.module, "_tied_weights_keys", None) or [])
            if unexpected or [k for k in missing if k not in tied]:
                raise ModelError(
                    f"checkpoint {found.path} does not match the model: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}: resume with the same model.path"
                )
            if getattr(self.module.config, "tie_word_embeddings", False):
                self.module.tie_weights()
            self.optimizer.load_state_dict(found.optimizer_state())
        self.scheduler.load_state_dict(found.scheduler_state())
        rng = found.rng(self.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.version = int(found.trainer["version"])
        self.skipped_steps = int(found.trainer.get("skipped_steps", 0))
        self.barrier()
        return found.extra

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
