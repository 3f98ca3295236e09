"""Checkpoints that are either complete or ignored, and resume exactly.

Layout of a run's checkpoint root::

    ckpt-00000012/          one directory per save (step zero-padded so names sort)
        model.safetensors   HF save_pretrained output (+ config.json, generation_config.json,
        config.json ...     tokenizer files copied from the model directory): transformers and vLLM
                            load the directory as is
        optimizer.pt        optimizer state dict  (torch.save; loaded with weights_only=True)
        sharded/            instead of optimizer.pt when the learner is sharded (FSDP2) or its master
                            weights' dtype (learner.param_dtype) differs from model.dtype: the master
                            weights and the optimizer state, each rank writing its own shard
                            (torch.distributed.checkpoint), so a resume reads 1/world of it per rank
                            and may reshard; model.safetensors is then the export in model.dtype
        adapter/            with learner.lora: peft's adapter_model.safetensors + adapter_config.json
                            (the trained adapter, master dtype; a resume loads it onto model.path's
                            base), optimizer.pt holds the adapter's optimizer state and
                            model.safetensors the merged model (treepo merge-lora merges an adapter)
        scheduler.pt        scheduler state dict  (same)
        rng-rank<r>.pt      torch/numpy/python (and CUDA) RNG states of every rank
        trainer.json        step, policy version, skipped steps, the controller's ``extra`` dict
        manifest.json       size and sha256 of every other file, written last
    latest                  a small text file naming the published directory

A save writes everything into ``.tmp-ckpt-<step>``, fsyncs the files, renames the directory to
``ckpt-<step>`` and only then publishes it by replacing ``latest`` atomically (temp file + fsync +
os.replace). A crash at any point leaves the previous checkpoint published. Loading verifies the
manifest (sizes and hashes); a truncated or corrupt checkpoint is skipped with a warning naming it
and the older one used instead. Old checkpoints beyond ``keep_last`` are deleted, never the one
``latest`` names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from common.errors import CheckpointError
from common.models import LATEST

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER = "trainer.json"
SHARDED_DIR = "sharded"
FORMAT_VERSION = 1
_DIR_RE = re.compile(r"^ckpt-(\d+)$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ save


def begin(root: str | os.PathLike, step: int) -> Path:
    """Create the (empty) temporary directory of a save; a leftover from a crashed save is removed."""
    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    tmp = root_p / f".tmp-{ckpt_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    path = tmp / f"rng-rank{rank}.pt"
    torch.save(rng_state(), path)
    _fsync_file(path)


def write_sharded(tmp: Path, state: dict[str, Any]) -> None:
    """Every rank writes its shard of ``state`` (master weights and optimizer state, DTensors or plain
    tensors) into ``tmp/sharded`` with torch.distributed.checkpoint. Collective in a process group."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=tmp / SHARDED_DIR, no_dist=_no_process_group())


def _no_process_group() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def export_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` cast to ``dtype`` (tensors that shared storage, e.g. tied embeddings, still do)."""
    cast: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        out[name] = cast[key]
    return out


def write_state(
    tmp: Path,
    model,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    scheduler_state: dict,
    trainer: dict[str, Any],
    tokenizer_dir: str | os.PathLike | None = None,
    export_dtype: str | None = None,
) -> None:
    """Write the model (HF format), optimizer (None: it is in ``sharded/``), scheduler and trainer
    state into ``tmp`` (rank 0). ``export_dtype`` names the saved weights' dtype in config.json."""
    model.save_pretrained(tmp, state_dict=model_state)
    if export_dtype is not None:
        config = json.loads((tmp / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = export_dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
    (tmp / TRAINER).write_text(json.dumps({"format": FORMAT_VERSION, **trainer}, indent=1, sort_keys=True))


def publish(root: str | os.PathLike, tmp: Path, step: int, keep_last: int) -> Path:
    """Manifest, fsync, rename to ``ckpt-<step>``, point ``latest`` at it, prune old ones."""
    root_p = Path(root)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for p in [*files, tmp / MANIFEST]:
        _fsync_file(p)
    _fsync_dir(tmp)
    final = root_p / ckpt_name(step)
    if final.exists():  # an unpublished leftover of a crashed run with the same step
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root_p)
    _atomic_write_text(root_p / LATEST, final.name + "\n")
    prune(root_p, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete checkpoints beyond the newest ``keep_last`` (never the published one) and stale temps."""
    published = _read_latest(root)
    dirs = _checkpoint_dirs(root)
    keep = {d.name for d in dirs[:keep_last]}
    if published:
        keep.add(published)
    for d in dirs:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
    for tmp in root.glob(".tmp-ckpt-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer: dict[str, Any],
    keep_last: int = 2,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Single-process save (a learner group uses begin/write_rng/write_state/publish)."""
    tmp = begin(root, step)
    write_rng(tmp, 0)
    write_state(tmp, model, None, optimizer.state_dict(), scheduler.state_dict(), trainer, tokenizer_dir)
    return publish(root, tmp, step, keep_last)


# ------------------------------------------------------------------------------------------ load


@dataclass
class Checkpoint:
    path: Path
    trainer: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        """All tensors of the saved model (single file or an HF sharded index)."""
        single = self.path / "model.safetensors"
        if single.is_file():
            return load_file(single)
        index = self.path / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(self.path / shard))
        return out

    @property
    def sharded(self) -> bool:
        """Whether master weights and optimizer state are in ``sharded/`` (see :func:`write_sharded`)."""
        return (self.path / SHARDED_DIR).is_dir()

    def read_sharded(self, state: dict[str, Any]) -> None:
        """Fill ``state`` (shaped like :func:`write_sharded`'s, sharded as this rank holds it) in place
        from ``sharded/``; each rank reads only what its shards need. Collective in a process group."""
        import torch.distributed.checkpoint as dcp

        dcp.load(state, checkpoint_id=self.path / SHARDED_DIR, no_dist=_no_process_group())

    def optimizer_state(self) -> dict:
        return torch.load(self.path / "optimizer.pt", weights_only=True, map_location="cpu")

    def scheduler_state(self) -> dict:
        return torch.load(self.path / "scheduler.pt", weights_only=True, map_location="cpu")

    def rng(self, rank: int) -> dict[str, Any] | None:
        path = self.path / f"rng-rank{rank}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _DIR_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return name if _DIR_RE.match(name) else None


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (an incomplete save)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({type(e).__name__})"
    if TRAINER not in files:
        return f"manifest lists no {TRAINER}"
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta.get('size')} (truncated?)"
        if _sha256(p) != meta.get("sha256"):
            return f"{rel} does not match its sha256 (corrupt)"
    return None


def find_checkpoint(root: str | os.PathLike, fallback: bool = True) -> Checkpoint | None:
    """The published checkpoint, or the newest older intact one (with a warning); None if none exist.

    Raises CheckpointError when checkpoints exist but none is intact, and, with ``fallback=False``
    (the pipeline: the queue entries a checkpoint covers are acknowledged once it is published, so an
    older one would silently lose them), when the published one is not intact.
    """
    root_p = Path(root)
    dirs = _checkpoint_dirs(root_p)
    published = _read_latest(root_p)
    if not dirs and published is None:
        return None
    if published is not None:
        pub_step = int(_DIR_RE.match(published).group(1))
        # newer directories than the pointer were never published (crash before the pointer moved)
        candidates = [root_p / published] + [
            d for d in dirs if int(_DIR_RE.match(d.name).group(1)) < pub_step
        ]
    else:
        log.warning(
            "checkpoint root %s has no readable '%s' pointer: using the newest intact checkpoint",
            root_p,
            LATEST,
        )
        candidates = dirs
    reasons = []
    for cand in candidates:
        reason = verify(cand) if cand.is_dir() else "directory is missing"
        if reason is not None and not fallback and cand.name == published:
            raise CheckpointError(_refusal(root_p, published, reason))
        if reason is None:
            if published is not None and cand.name != published:
                log.warning(
                    "checkpoint %s is unusable (%s); falling back to the previous checkpoint %s",
                    root_p / published,
                    reasons[0][1] if reasons else "?",
                    cand,
                )
            trainer = json.loads((cand / TRAINER).read_text())
            return Checkpoint(cand, trainer, dict(trainer.get("extra", {})))
        reasons.append((cand, reason))
    detail = "; ".join(f"{c.name}: {r}" for c, r in reasons)
    raise CheckpointError(
        f"no intact checkpoint under {root_p} ({detail}): delete the run directory to start over"
    )


def _refusal(root: Path, published: str, reason: str) -> str:
    older = [d.name for d in _checkpoint_dirs(root) if d.name < published]
    fix = (
        f"or, accepting that the trees trained after {older[0]} are lost, delete {root / published} and "
        f"{root / LATEST} to resume from {older[0]}"
        if older
        else "or start a new run_dir"
    )
    return (
        f"the newest checkpoint {root / published} is unusable ({reason}) and the queue entries it covers "
        f"are already acknowledged, so resuming from an older one would lose them: restore {published} "
        f"from a copy, {fix}"
    )


def require_checkpoint(root: str | os.PathLike, fallback: bool = True) -> Checkpoint:
    """``find_checkpoint`` for a resume: a missing checkpoint is an error."""
    ckpt = find_checkpoint(root, fallback)
    if ckpt is None:
        raise CheckpointError(
            f"resume was requested but {root} holds no checkpoint: run without resume, or point run_dir "
            "at the run to continue"
        )
    return ckpt
