"""``treepo plan``: the memory plan of a config (``common/plan.py``): per-GPU memory of an engine and of
a learner rank, the weight sync's peak, checkpoint size and resume read time; a table, or JSON.
Exit status 0 when every GPU side fits, 1 when one does not (the line names the key to change).

Node types: a config that pins engines or learner ranks to nodes (``generators.ray_resources`` /
``learner.ray_resources``) is planned on every worker node type of the Ray cluster YAMLs that offers
those resources (``--cluster``; by default the repository's ``cluster/*.yaml``), one side per GPU
size, the GPU memory from the node's instance type (``common.plan.INSTANCE_GPU_GIB``) or
``--gpu-mem NODE_TYPE=GIB``. Without pinned resources, ``generators.gpu_memory_gib`` /
``learner.gpu_memory_gib`` give the one GPU size of each side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import ConfigError
from common.plan import DEFAULT_READ_GBPS, INSTANCE_GPU_GIB, Node, gpu_sides, make_plan, table

CLUSTER_DIR = Path(__file__).resolve().parents[1]  # cluster/: the repository's Ray cluster YAMLs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="Preset YAML: a path or a name in configs/ (e.g. qwen2.5-7b-treepo).",
    )
    p.add_argument("--json", action="store_true", help="Print the plan as JSON instead of the table.")
    p.add_argument(
        "--read-gbps",
        type=float,
        default=DEFAULT_READ_GBPS,
        help=f"Read bandwidth of the checkpoint file system in GB/s for the resume time (default {DEFAULT_READ_GBPS:g}).",
    )
    p.add_argument(
        "--cluster",
        action="append",
        default=None,
        metavar="YAML",
        help="Ray cluster YAML whose node types the sides are planned on (repeatable; 'none': only the "
        "gpu_memory_gib keys). Default: cluster/*.yaml when the config sets generators.ray_resources "
        "or learner.ray_resources.",
    )
    p.add_argument(
        "--gpu-mem",
        action="append",
        default=[],
        metavar="NODE_TYPE=GIB",
        help="GPU memory in GiB of a node type (repeatable), for instance types the plan does not know.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, as for `treepo train`."
    )


def _gpu_mem(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, gib = item.partition("=")
        try:
            out[name.strip()] = float(gib)
        except ValueError:
            out[name.strip()] = -1.0
        if not name.strip() or not out[name.strip()] > 0:
            raise ConfigError(
                f"--gpu-mem {item!r}: give NODE_TYPE=GIB with GIB > 0, e.g. --gpu-mem gpu_generator=80"
            )
    return out


def _node_gib(path: Path, name: str, node: dict, gpu_mem: dict[str, float]) -> float:
    if name in gpu_mem:
        return gpu_mem[name]
    config = node.get("node_config") or {}
    instance = config.get("InstanceType") or config.get("machineType")
    if instance in INSTANCE_GPU_GIB:
        return INSTANCE_GPU_GIB[instance]
    raise ConfigError(
        f"{path.name}: node type {name!r} (instance type {instance!r}) has no GPU memory in "
        f"common/plan.py's INSTANCE_GPU_GIB: pass --gpu-mem {name}=GIB"
    )


def cluster_nodes(cfg, paths: list[Path], gpu_mem: dict[str, float]) -> dict[str, list[Node]]:
    """Per side ("engine", "learner"), one :class:`Node` per GPU size among the worker node types of
    ``paths`` that offer the side's ``ray_resources`` (and GPUs); the names list the node types."""
    import yaml

    sizes: dict[str, dict[float, list[str]]] = {"engine": {}, "learner": {}}
    wanted = {"engine": cfg.generators.ray_resources, "learner": cfg.learner.ray_resources}
    for path in paths:
        raw = yaml.safe_load(path.read_text()) or {}
        for name, node in (raw.get("available_node_types") or {}).items():
            offered = node.get("resources") or {}
            if name == raw.get("head_node_type") or not offered.get("GPU"):
                continue
            for side, resources in wanted.items():
                if all(offered.get(k) for k in resources):
                    gib = _node_gib(path, name, node, gpu_mem)
                    label = f"{path.name}:{name}" if len(paths) > 1 else name
                    sizes[side].setdefault(gib, []).append(label)
    return {
        side: [Node(", ".join(names), gib) for gib, names in sorted(by_gib.items())]
        for side, by_gib in sizes.items()
    }


def _cluster_paths(cfg, given: list[str] | None) -> list[Path]:
    if given == ["none"]:
        return []
    if given:
        paths = [Path(p) for p in given]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"--cluster {missing[0]}: no such file; give a Ray cluster YAML or 'none'")
        return paths
    pinned = cfg.generators.ray_resources or cfg.learner.ray_resources
    return sorted(CLUSTER_DIR.glob("*.yaml")) if pinned else []


def _verdict(plan, checked: list[str], misfits: list[str]) -> list[str]:
    if not checked:
        return ["verdict: no side runs on a GPU (CPU run): nothing to check"]
    if misfits:
        return [f"verdict: does not fit: {fix}" for fix in misfits]
    sizes = {s.capacity / (1 << 30) for s in (*plan.engines, *plan.learners)}
    a100 = " (A100-80GB)" if sizes == {80.0} else ""
    gib = " / ".join(f"{s:g}" for s in sorted(sizes))
    return [f"verdict: fits on {gib} GiB GPUs{a100}: {', '.join(checked)} checked"]


def run(args: argparse.Namespace) -> int:
    from common.config import load_config

    if not args.read_gbps > 0:
        raise ConfigError(
            f"--read-gbps={args.read_gbps} must be > 0: give the file system's read bandwidth in GB/s"
        )
    gpu_mem = _gpu_mem(args.gpu_mem)
    cfg = load_config(args.config, list(args.overrides))
    paths = _cluster_paths(cfg, args.cluster)
    nodes = cluster_nodes(cfg, paths, gpu_mem) if paths else None
    plan = make_plan(cfg, read_gbps=args.read_gbps, nodes=nodes)
    checked = gpu_sides(cfg)
    misfits = plan.refusals(checked)
    if args.json:
        out = {**plan.as_dict(), "checked": checked, "refused": misfits}
        out["clusters"] = [str(p) for p in paths]
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print(table(plan))
        print()
        print("\n".join(_verdict(plan, checked, misfits)))
    return 1 if misfits else 0
