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

Two ways to generate, both over the engine's step loop (``LLMEngine.add_request`` / ``step``):
``generate`` (a batch, returned together) and the request stream (``add_request`` /
``step_requests``: one engine step at a time, so the sampler can add a child segment while other
requests run). Every engine step counts the requests in the engine (``counters.engine_steps`` /
``engine_requests``: the batch occupancy). Weights change and the prefix cache resets only with no
request of the stream in the engine (the sampler drains first): a segment is sampled under one version.
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
        self._open: dict[str, int] = {}  # request id -> prompt tokens, for requests in the engine
        self._finished: dict[str, GenResult] = {}  # finished, not yet handed out
        self._batch_ids: set[str] = set()  # requests of a running generate() call
        self._batch_seq = 0
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
        """One batched call over the engine's step loop (requests of the stream in flight meanwhile
        keep running; their results wait for :meth:`step_requests`)."""
        if not requests:
            return []
        ids = [f"treepo-batch-{self._batch_seq}-{i}" for i in range(len(requests))]
        self._batch_seq += 1
        self._add(ids, requests)
        self._batch_ids.update(ids)
        try:
            while not all(rid in self._finished for rid in ids):
                self._engine_step()
        finally:
            self._batch_ids.difference_update(ids)
        results = [self._finished.pop(rid) for rid in ids]
        self.counters.add(results)
        return results

    # ------------------------------------------------------------------ the request stream
    def add_request(self, request_id: str, request: GenRequest) -> None:
        """Queue one request of the stream; it starts at the next engine step."""
        self._add([str(request_id)], [request])

    def step_requests(self) -> list[tuple[str, GenResult]]:
        """One engine step (unless results of the stream are already waiting); the stream's requests
        that finished, as ``(request_id, result)``."""
        if not self._stream_done() and self._open:
            self._engine_step()
        done = [(rid, self._finished.pop(rid)) for rid in self._stream_done()]
        self.counters.add([r for _, r in done], calls=0)
        return done

    @property
    def unfinished_requests(self) -> int:
        """Requests of the stream not yet returned by :meth:`step_requests`."""
        return sum(1 for rid in self._open if rid not in self._batch_ids) + len(self._stream_done())

    def _stream_done(self) -> list[str]:
        return [rid for rid in self._finished if rid not in self._batch_ids]

    def _add(self, request_ids: Sequence[str], requests: Sequence[GenRequest]) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        for rid in request_ids:
            if rid in self._open or rid in self._finished:
                raise ValueError(f"request id {rid!r} is already in the engine: use a unique id")
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in r.prompt_ids]) for r in requests]
        # rendered as LLM.generate renders them (a raw prompt still works, with a deprecation warning)
        render = getattr(self.llm, "_preprocess_cmpl", None)
        inputs = render(prompts) if callable(render) else prompts
        for rid, req, prompt in zip(request_ids, requests, inputs):
            params = self._params(req.max_tokens, req.seed)
            params.output_kind = RequestOutputKind.FINAL_ONLY  # only the finished output comes back
            self.llm.llm_engine.add_request(rid, prompt, params)
            self._open[rid] = len(req.prompt_ids)

    def _engine_step(self) -> None:
        """One step of the engine; finished requests move to :attr:`_finished`."""
        running = len(self._open)
        outputs = self.llm.llm_engine.step()
        self.counters.add_engine_step(running)
        for out in outputs:
            if not out.finished or out.request_id not in self._open:
                continue
            comp = out.outputs[0]
            toks = [int(t) for t in comp.token_ids]
            lps = [float(comp.logprobs[i][t].logprob) for i, t in enumerate(toks)]
            reason = "stop" if comp.finish_reason == "stop" else "length"
            n_prompt = self._open.pop(out.request_id)
            self._finished[out.request_id] = GenResult(
                toks, lps, reason, n_prompt, int(out.num_cached_tokens or 0)
            )

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        """Load ``named_tensors`` into the engine. In-process the iterator streams into the reload one
        tensor at a time (no copy of the whole model). A multiprocess engine gets them through
        safetensors files written bucket by bucket (:attr:`update_bucket_bytes` each): this process
        holds one bucket's host copies at a time, never the whole model, and the worker reads the files
        back one tensor at a time into the reload."""
        self._check_idle("update_weights")
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
        self._check_idle("reset_prefix_cache")
        self.llm.reset_prefix_cache()

    def _check_idle(self, what: str) -> None:
        if self._open:
            raise RuntimeError(
                f"{what} with {len(self._open)} requests in the engine: drain the sampler first "
                "(TreeSampler.drain), so that every segment is sampled under one policy version"
            )

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
        self._check_idle("apply_staged")
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
