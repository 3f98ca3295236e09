#!/usr/bin/env bash
# Builds .gpu-vendor/: the Python packages that scripts/gpu_checks.py and tests/gpu import beyond torch,
# at the versions of this project's .venv, for a GPU machine that has python + torch (CUDA) and no
# network. Carry it along and put it first on the path there:
#
#   bash scripts/gpu_vendor.sh                                           # here
#   PYTHONPATH=.gpu-vendor:. python3 scripts/gpu_checks.py --out $OUT    # there, carry [".gpu-vendor"]
#
# What goes in (the import closure of those paths, found by running them in a venv that holds only
# torch and numpy with PYTHONPATH=.gpu-vendor): transformers (its models/ pruned to auto + qwen2, the
# only family loaded; transformers discovers model packages from the directory), tokenizers, safetensors,
# huggingface_hub and the HTTP client it imports, omegaconf + antlr4 (common.config), msgpack
# (weight-sync metadata, tree wire format), PyYAML, regex, tqdm, packaging.
# Not vendored: torch and its own dependencies (filelock, fsspec, jinja2, sympy, typing_extensions, ...)
# and numpy (~40 MiB per Python version; the GPU image has it): gpu_checks.py prints every package's
# version and whether it came from .gpu-vendor or the system.
#
# Compiled packages come as manylinux x86_64 wheels: tokenizers and safetensors are abi3 (any CPython
# >= 3.9); regex is built per version, for each Python in GPU_VENDOR_PYTHONS (default "3.12 3.11": the
# GPU image's python3 was seen as 3.12, and 3.11 is this machine's, so the folder can be tried here
# first; the extension modules carry the version in their file names and sit side by side).
# .gpu-vendor/PYTHON_TAGS lists those versions; gpu_checks.py ignores the folder on any other Python.
# The folder is excluded from git through .git/info/exclude (it only travels when carried).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PYTHONS=${GPU_VENDOR_PYTHONS:-"3.12 3.11"}
OUT=.gpu-vendor
KEEP_MODELS="auto qwen2"
LIMIT_MIB=60

PACKAGES=(
  transformers tokenizers safetensors huggingface_hub
  httpx2 httpcore2 h11 anyio sniffio idna certifi truststore
  omegaconf antlr4-python3-runtime msgpack PyYAML regex tqdm packaging
)

pins=()
for p in "${PACKAGES[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) || {
    echo "[gpu-vendor] error: $p is not installed in $PY's environment; run scripts/setup.sh first" >&2
    exit 1
  }
  pins+=("$p==$v")
done
echo "[gpu-vendor] pins: ${pins[*]}"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-vendor.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tags=()
for pyver in $PYTHONS; do
  tag="cp${pyver/./}"
  echo "[gpu-vendor] wheels for CPython $pyver (manylinux x86_64)"
  "$PY" -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$tmp/$tag" \
    --python-version "$pyver" --implementation cp --abi "$tag" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${pins[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  tags+=("$tag")
done

rm -rf "$OUT"
mkdir -p "$OUT"
for tag in "${tags[@]}"; do
  # the first Python's tree, then only what the others add (their version-tagged extension modules)
  cp -a -n "$tmp/$tag/." "$OUT/"
done
# Model code of the families not used (31 of transformers' 50 MiB). Only the modeling files go:
# configuration, tokenization and image-processing modules of many models are imported by transformers'
# core and auto classes (image processors whenever Pillow is installed, as on the GPU image).
for d in "$OUT"/transformers/models/*/; do
  name=$(basename "$d")
  case " $KEEP_MODELS " in *" $name "*) continue ;; esac
  rm -f "$d"modeling_*.py "$d"modular_*.py
done
# msgpack and PyYAML run pure Python without their optional C accelerators (official fallbacks; speed
# does not matter for sync metadata and config files): one copy then serves every Python version.
rm -f "$OUT"/msgpack/_cmsgpack.*.so "$OUT"/yaml/_yaml.*.so
rm -rf "$OUT"/bin
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
echo "${tags[*]}" > "$OUT/PYTHON_TAGS"
printf '%s\n' "${pins[@]}" > "$OUT/PINS"

if [ -d .git ] && ! grep -qx '/.gpu-vendor/' .git/info/exclude 2>/dev/null; then
  echo '/.gpu-vendor/' >> .git/info/exclude
fi

bytes=$(du -sb "$OUT" | cut -f1)  # file sizes, what travels (on disk it takes a few MiB more in blocks)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "[gpu-vendor] $OUT: ${mib} MiB in $(find "$OUT" -type f | wc -l) files, for ${tags[*]}"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "[gpu-vendor] error: over ${LIMIT_MIB} MiB; the device's working tree limit is 64 MiB in all" >&2
  exit 1
fi
