"""vLLM generation backend: automatic prefix caching, token ids in and out, one ``n=1`` request per path.

Engine settings, as checked against the CPU build and the GPU release: ``skip_tokenizer_init=True`` with ``TokensPrompt``
(so EOS handling is ``stop_token_ids`` = every EOS id; with stop strings the engine loads the
tokenizer and detokenizes so that it ends a request at one), ``logprobs=0`` with an explicit
``logprobs_mode``, KV-cache size in bytes on CPU (``gpu_memory_utilization`` would mean a share of
host RAM there), and a block size the sampler aligns segment ends to. ``RequestOutput.num_cached_tokens``
gives the prompt tokens served from the prefix cache.

Weight updates: plain ``model.load_weights`` fails after the CPU build repacks weights, so every
update runs inside the worker through a worker extension (:class:`TreepoWorkerExtension`) that calls
``reload_weights(weights_iterator=..., is_checkpoint_format=True)`` (the layerwise reload). Two ways in:

- per engine worker (``sync.receiver``: the default for engines in worker processes, i.e. the
  multiprocess engine and tensor parallelism): each worker process is itself a receiver rank of the
  weight-sync group (rank = the engine's base rank + the worker's rank). ``sync_receive_start`` makes
  every worker receive in a background thread (:class:`actors.backends.worker_sync.WorkerSync`) and
  returns at once, so the engine keeps generating while the bytes arrive; ``sync_receive_wait`` polls
  until every worker has the update staged; ``apply_staged`` reloads it at a segment boundary. Only
  control messages travel through ``collective_rpc`` (it cannot carry tensors across processes).
  Client calls from two threads (the generation loop and the sync) are serialized where vLLM's
  multiprocess client sends on its socket, which is not thread-safe.
- through the caller (``update_weights``): the generator's process receives and hands the tensors
  over. With the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) that is a direct call; with
  the multiprocess engine they go through temporary safetensors files written bucket by bucket and
  read back tensor by tensor (slow: kept for ``sync.receiver=generator`` and for callers outside the
  pipeline; neither side holds a copy of the whole model).

vLLM does not drop cached KV after an update: ``generators.reset_prefix_cache_on_update`` decides.
"""

from __future__ import annotations

import atexit
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from actors.backends.base import BackendCounters, GenRequest, GenResult, stop_ids
from actors.backends.engine_guard import mark_owner
from common.config import GeneratorConfig, SamplingConfig
from common.errors import ModelError, SyncError

EXTENSION = "actors.backends.vllm_backend.TreepoWorkerExtension"
DEFAULT_BUCKET_BYTES = 64 << 20


def write_buckets(named_tensors: Iterable[tuple[str, Any]], directory: str, bucket_bytes: int) -> list[str]:
    """Write ``named_tensors`` into safetensors files of about ``bucket_bytes`` each (a tensor larger
    than that gets a file of its own), in order; returns their paths. Only one bucket's host copies
    are alive at a time: a tensor is copied to the host as it arrives and dropped once its file is
    written. Tensors sharing storage (tied embeddings) or viewing part of one are cloned (safetensors
    refuses shared storage)."""
    from safetensors.torch import save_file

    paths: list[str] = []
    bucket: dict[str, Any] = {}
    size = 0
    seen: set[int] = set()

    def flush() -> None:
        nonlocal bucket, size
        if bucket:
            path = os.path.join(directory, f"part-{len(paths):05d}.safetensors")
            save_file(bucket, path)
            paths.append(path)
        bucket, size = {}, 0
        seen.clear()

    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        if bucket and size + t.nbytes > bucket_bytes:
            flush()
            seen.add(t.untyped_storage().data_ptr())
        bucket[name] = t
        size += t.nbytes
        del t
    flush()
    return paths


class TreepoWorkerExtension:
    """Mixed into vLLM's worker class; methods are called with ``llm.collective_rpc(name, args=...)``."""

    def treepo_reload_weights(self, weights: Iterable[tuple[str, Any]]) -> int:
        """Reload from ``weights`` as it yields (a stream: no tensor is held beyond the one loading)."""
        count = 0

        def counted():
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        return count

    def treepo_reload_weights_from_files(self, paths: Sequence[str]) -> int:
        """Reload from safetensors files (the buckets of :meth:`VLLMBackend.update_weights`), one
        tensor read at a time (no copy of the whole model in the worker)."""
        from safetensors import safe_open

        def stream():
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        yield name, f.get_tensor(name)

        return self.treepo_reload_weights(stream())

    # one weight-sync receiver rank per worker: thin calls into actors.backends.worker_sync.WorkerSync
    def _treepo_sync(self):
        sync = getattr(self, "_treepo_worker_sync", None)
        if sync is None:
            from actors.backends.worker_sync import WorkerSync

            sync = self._treepo_worker_sync = WorkerSync()
        return sync

    def treepo_sync_join(self, info: dict, base_rank: int, timeout_s: float) -> int:
        """Join group ``info`` as rank ``base_rank`` + this worker's rank in its engine; returns that rank."""
        return self._treepo_sync().join(info, int(base_rank) + int(self.rank), timeout_s)

    def treepo_sync_start(self) -> None:
        self._treepo_sync().start()

    def treepo_sync_poll(self) -> dict:
        return self._treepo_sync().poll()

    def treepo_sync_apply(self, version: int) -> int:
        """Reload the staged update of ``version`` and drop its buffers; returns the tensors applied."""
        import torch

        weights = self._treepo_sync().take(version)
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the reload reads the buffers asynchronously: finish before freeing
        return len(weights)

    def treepo_sync_discard(self, version: int | None = None) -> None:
        self._treepo_sync().discard(version)

    def treepo_sync_close(self) -> None:
        self._treepo_sync().close()


class VLLMBackend:
    """:class:`actors.backends.base.GenerationBackend` over ``vllm.LLM``."""

    def __init__(
        self,
        model_path: str,
        gen_cfg: GeneratorConfig,
        sampling_cfg: SamplingConfig,
        *,
        dtype: str = "float32",
        eos_ids: Sequence[int] | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        stop_strings: Sequence[str] = (),
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self.gen_cfg = gen_cfg
        self.sampling = sampling_cfg
        self.eos_ids = stop_ids(model_path, eos_ids)
        # stop strings (generators.stop) need the engine's detokenizer: it then ends a request at one
        # (the sampler still cuts, as a string split across two requests is invisible to the engine)
        self.stop_strings = [str(x) for x in stop_strings]
        self.policy_version = 0
        self.update_bucket_bytes = DEFAULT_BUCKET_BYTES  # update_weights through files (multiprocess)
        self.counters = BackendCounters()
        self.on_cpu = current_platform.is_cpu()
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        self._send_serialized = self.in_process  # an in-process engine has no socket
        kwargs: dict[str, Any] = dict(
            model=model_path,
            skip_tokenizer_init=not self.stop_strings,
            enable_prefix_caching=True,
            block_size=gen_cfg.block_size,
            enforce_eager=gen_cfg.enforce_eager,
            dtype=dtype,
            max_num_batched_tokens=gen_cfg.max_num_batched_tokens,
            seed=seed,
            logprobs_mode=sampling_cfg.logprobs_mode,
            worker_extension_cls=EXTENSION,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(gen_cfg.kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = max(gen_cfg.gpus_per_engine, 1)
        kwargs.update(llm_kwargs)
        mark_owner()  # engine processes started now stop themselves if this process dies first
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types at start-up; name the model and the settings
            raise ModelError(
                f"vLLM could not start on {model_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "check generators.kv_cache_gib / block_size / max_num_batched_tokens, or use generators.backend=hf"
            ) from e
        self._block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self._workers = int(self.llm.llm_engine.vllm_config.parallel_config.world_size)
        self._serialize_client_sends()
        # at interpreter exit, before multiprocessing joins the (non-daemon) engine core process
        # forever: atexit runs in reverse order and multiprocessing registered its hook at import
        atexit.register(_close_at_exit, weakref.ref(self))

    def _serialize_client_sends(self) -> None:
        """vLLM's multiprocess client sends every call on one ZMQ socket without a lock; the generation
        loop and the weight sync call it from two threads, so its send is wrapped in a lock."""
        if self.in_process:
            return
        client = self.llm.llm_engine.engine_core
        send = getattr(client, "_send_input", None)
        if send is None:  # another client type (vLLM is pinned): weight-sync calls must not race
            self._send_serialized = False
            return
        lock = threading.Lock()

        def locked_send(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return send(*args, **kwargs)

        client._send_input = locked_send
        self._send_serialized = True

    @property
    def block_size(self) -> int:
        return self._block_size

    def _params(self, max_tokens: int, seed: int | None):
        from vllm import SamplingParams

        s = self.sampling
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            logprobs=0,
            stop_token_ids=list(self.eos_ids),
            # an explicit empty EOS list means "never stop early" (benchmarks of the analytic case);
            # otherwise vLLM also adds generation_config's EOS ids to the stop ids
            ignore_eos=not self.eos_ids,
            seed=seed,
            detokenize=bool(self.stop_strings),
            stop=list(self.stop_strings),
        )

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in r.prompt_ids]) for r in requests]
        params = [self._params(r.max_tokens, r.seed) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs):
            comp = out.outputs[0]
            toks = [int(t) for t in comp.token_ids]
            lps = [float(comp.logprobs[i][t].logprob) for i, t in enumerate(toks)]
            reason = "stop" if comp.finish_reason == "stop" else "length"
            results.append(GenResult(toks, lps, reason, len(req.prompt_ids), int(out.num_cached_tokens or 0)))
        self.counters.add(results)
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        """Load ``named_tensors`` into the engine. In-process the iterator streams into the reload one
        tensor at a time (no copy of the whole model). A multiprocess engine gets them through
        safetensors files written bucket by bucket (:attr:`update_bucket_bytes` each): this process
        holds one bucket's host copies at a time, never the whole model, and the worker reads the files
        back one tensor at a time into the reload."""
        if self.in_process:
            stream = ((name, t.detach()) for name, t in named_tensors)
            self.llm.collective_rpc("treepo_reload_weights", args=(stream,))
        else:  # collective_rpc pickles its arguments across processes: tensors cannot travel that way
            with tempfile.TemporaryDirectory(prefix="treepo-weights-") as tmp:
                paths = write_buckets(named_tensors, tmp, self.update_bucket_bytes)
                self.llm.collective_rpc("treepo_reload_weights_from_files", args=(paths,))
        if self.gen_cfg.reset_prefix_cache_on_update:
            self.reset_prefix_cache()
        self.policy_version = int(version)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ one receiver rank per worker
    @property
    def receiver_ranks(self) -> int:
        """Weight-sync ranks this engine contributes when its workers receive: one per worker process
        (tensor × pipeline parallel size)."""
        return self._workers

    def _sync_rpc(self, method: str, *args: Any) -> list[Any]:
        if not self._send_serialized:
            raise SyncError(
                "this vLLM client has no send method to serialize, so the engine's workers cannot receive "
                "weights beside generation: set sync.receiver=generator"
            )
        try:
            return self.llm.collective_rpc(method, args=args)
        except SyncError:
            raise
        except Exception as e:  # the worker's error comes back as a generic exception with its text
            text = str(e).strip()
            inner = re.search(r"failed with error '(.*)'", text, re.S)  # the multiprocess executor's wrapping
            text = inner.group(1) if inner else (text.splitlines()[-1] if text else type(e).__name__)
            raise SyncError(f"engine workers failed {method}: {text}") from e

    def sync_join(self, info: Mapping[str, Any], base_rank: int, timeout_s: float) -> list[int]:
        """Every worker targets group ``info`` as rank ``base_rank`` + its rank in the engine (ranks
        ``base_rank .. base_rank + receiver_ranks - 1``); connects when the next receive starts."""
        ranks = [
            int(r) for r in self._sync_rpc("treepo_sync_join", dict(info), int(base_rank), float(timeout_s))
        ]
        want = list(range(int(base_rank), int(base_rank) + self.receiver_ranks))
        if sorted(ranks) != want:
            raise SyncError(f"engine workers took weight-sync ranks {ranks}, expected {want}")
        return ranks

    def sync_receive_start(self) -> None:
        """Every worker starts receiving the next update in a thread of its own; returns at once."""
        self._sync_rpc("treepo_sync_start")

    def sync_poll(self) -> list[dict[str, Any]]:
        """Each worker's receive state (see :meth:`actors.backends.worker_sync.WorkerSync.poll`)."""
        return list(self._sync_rpc("treepo_sync_poll"))

    def sync_receive_wait(self, timeout_s: float | None = None, poll_s: float = 0.05) -> int:
        """Poll until every worker has the update staged; returns its version. Raises :class:`SyncError`
        with the workers' messages if one failed, or after ``timeout_s`` (None: until the workers'
        threads end, which their ``sync.timeout_s`` waits bound). Polling keeps the engine free: a
        blocking wait inside a worker would stop generation."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            states = self.sync_poll()
            failed = [s for s in states if s["state"] == "failed"]
            if failed:
                raise SyncError("; ".join(f"engine worker rank {s['rank']}: {s['error']}" for s in failed))
            if any(s["state"] == "idle" for s in states):
                raise SyncError(
                    "an engine worker has no receive running (a newer sync_join superseded it, or "
                    "sync_receive_start was not called)"
                )
            if all(s["state"] == "done" for s in states):
                versions = {int(s["version"]) for s in states}
                if len(versions) != 1:
                    raise SyncError(f"engine workers received different versions {sorted(versions)}")
                return versions.pop()
            if deadline is not None and time.monotonic() > deadline:
                raise SyncError(
                    f"engine workers still receiving after {timeout_s:g} s "
                    f"(ranks {[s['rank'] for s in states if s['state'] == 'receiving']})"
                )
            time.sleep(poll_s)

    def apply_staged(self, version: int) -> None:
        """Reload the staged update of ``version`` on every worker (dropping it and any older one),
        reset the prefix cache per the config and sample under ``version`` from now on."""
        self._sync_rpc("treepo_sync_apply", int(version))
        if self.gen_cfg.reset_prefix_cache_on_update:
            self.reset_prefix_cache()
        self.policy_version = int(version)

    def sync_discard(self, version: int | None = None) -> None:
        """Drop a staged update nobody will apply (None: all of them)."""
        self._sync_rpc("treepo_sync_discard", version)

    def sync_close(self) -> None:
        self._sync_rpc("treepo_sync_close")

    def close(self) -> None:
        """Shut the engine down and wait for its processes to end (vLLM terminates them after a grace
        period). In-process engines share vLLM's process-global distributed state: closing one breaks
        any other in-process engine of the same process (one engine per process). Idempotent."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(client, "shutdown", None)
        if callable(shutdown):
            shutdown()


def _close_at_exit(ref: weakref.ref) -> None:
    backend = ref()
    if backend is not None:
        backend.close()
