"""What a run reports about its machine: the Python packages it imports (and whether they came from
``.gpu-vendor``), the GPU nvidia-smi sees, what torch sees of the device."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / ".gpu-vendor"
PACKAGES = (
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
)


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _is_vendor(entry: str) -> bool:
    return bool(entry) and Path(entry).resolve() == VENDOR.resolve()


def use_vendor(enabled: bool = True) -> str:
    """Put the repository and (if built for this Python) ``.gpu-vendor`` first on sys.path, and on
    PYTHONPATH for the processes started from here; says what it did."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    tags_file = VENDOR / "PYTHON_TAGS"
    tags = tags_file.read_text().split() if tags_file.is_file() else []
    if not enabled:
        state = "disabled (--no-vendor)"
    elif not VENDOR.is_dir():
        state = "absent"
    elif tags and "any" not in tags and python_tag() not in tags:
        # a compiled module built for another Python would not load: the installed packages then
        state = f"ignored: built for {' '.join(tags)} Python, this is {python_tag()}"
    else:
        state = "on sys.path"
    use = state == "on sys.path"
    if use:  # no __pycache__ inside it: the folder travels to the GPU machine at the size it was built
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.path[:] = ([str(VENDOR)] if use else []) + [p for p in sys.path if not _is_vendor(p)]
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _is_vendor(p)]
    os.environ["PYTHONPATH"] = os.pathsep.join(([str(VENDOR)] if use else []) + [str(REPO)] + env)
    return state


def package_report() -> dict[str, str]:
    """Version and origin (vendor / system) of every package the checks import."""
    import importlib

    out = {}
    for mod in PACKAGES:
        try:
            m = importlib.import_module(mod)
        except Exception as e:  # report, do not fail: the checks that need it say so
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
        import actors.backends.worker_sync  # noqa: F401
        import actors.sampler  # noqa: F401
        import common.tiny  # noqa: F401
        import common.weight_sync  # noqa: F401
        import learner.packed_attention  # noqa: F401
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
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
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
            cudnn=torch.backends.cudnn.version(),
        )
    return rep
