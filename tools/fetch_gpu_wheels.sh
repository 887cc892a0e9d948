#!/usr/bin/env bash
# Collect the complete wheel set that the OpenMMLab stack needs on a machine
# without network whose image already has torch, triton, numpy, scipy,
# matplotlib, opencv, pyyaml, rich, click, markdown, einops, six, tqdm, zipp,
# pillow, packaging (the GPU image; see /work/.library/device/KINDS.md).
#
#   bash tools/fetch_gpu_wheels.sh [--python-version 3.12] [--mmcv cuda|any] DEST
#
#   --python-version  wheels for this CPython (default 3.12, the GPU image's)
#   --mmcv cuda       the mmcv 2.1.0 CUDA wheel from $MMCV_WHEELHOUSE/gpu/
#                     (default); `any` also accepts the CPU wheel in
#                     $MMCV_WHEELHOUSE/ (a CPU machine's check of the set)
#   MMCV_WHEELHOUSE   default: ../shared/wheels beside the repository (or beside
#                     the main checkout of a git worktree)
#
# Every wheel is pinned; a wheel that cannot be found is an error (exit 1).
# Re-running with the same DEST downloads nothing new.  Install on the GPU:
#   pip install --no-index --no-deps --target /tmp/site DEST/*.whl
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
pyver=3.12 mmcv_kind=cuda dest=''
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=$2; shift 2 ;;
    --mmcv) mmcv_kind=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "fetch_gpu_wheels: unknown option '$1'" >&2; exit 2 ;;
    *) dest=$1; shift ;;
  esac
done
[ -n "$dest" ] || { echo "usage: fetch_gpu_wheels.sh [--python-version X.Y] [--mmcv cuda|any] DEST" >&2; exit 2; }
tag=cp${pyver/./}

# The pure-Python / manylinux wheels, one pinned version each.  Why each one:
#   mmengine mmdet mmpretrain   the stack itself (mmcv comes from the wheelhouse)
#   addict yapf termcolor       mmengine/mmcv imports; yapf imports platformdirs
#   platformdirs
#   pycocotools shapely         mmdet (COCO metric, masks)
#   terminaltables
#   mat4py importlib-metadata   mmpretrain; importlib-metadata >= 10 needs
#                               another package, so < 10
#   model-index ordered-set     mmpretrain imports modelindex.load_model_index
#                               from `model-index` (NOT the empty `modelindex`
#                               0.0.2 placeholder); model-index needs ordered-set
#   setuptools<81               mmengine 0.10.x imports pkg_resources
WHEELS=(
  mmengine==0.10.7 mmdet==3.3.0 mmpretrain==1.2.0
  addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0
  pycocotools==2.0.11 shapely==2.2.0 terminaltables==3.1.10
  mat4py==0.6.0 importlib-metadata==9.1.0
  model-index==0.1.11 ordered-set==4.1.0
  setuptools==80.10.2
)

house=${MMCV_WHEELHOUSE:-}
if [ -z "$house" ]; then
  for cand in "$repo/../shared/wheels" \
      "$(dirname "$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo /nonexistent/x)")/../shared/wheels"; do
    if [ -d "$cand" ]; then house=$(cd "$cand" && pwd); break; fi
  done
fi
[ -n "$house" ] && [ -d "$house" ] || {
  echo "fetch_gpu_wheels: no mmcv wheelhouse: set MMCV_WHEELHOUSE (looked in $repo/../shared/wheels)" >&2
  exit 1; }
mmcv=$(compgen -G "$house/gpu/mmcv-2.1.0-$tag-$tag-*x86_64.whl" | head -1 || true)
if [ -z "$mmcv" ] && [ "$mmcv_kind" = any ]; then
  mmcv=$(compgen -G "$house/mmcv-2.1.0-$tag-$tag-*x86_64.whl" | head -1 || true)
fi
[ -n "$mmcv" ] || {
  echo "fetch_gpu_wheels: no mmcv 2.1.0 $tag wheel ($mmcv_kind) in $house/gpu/" \
       "(build one with tools/install_mmcv.py --cuda 1)" >&2
  exit 1; }
mkdir -p "$dest"
cp -f "$mmcv" "$dest/"

plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
log=$(mktemp)
if ! python3 -m pip download --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp --abi "$tag" --abi abi3 \
    --abi none "${plat[@]}" -d "$dest" "${WHEELS[@]}" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  rm -f "$log"
  echo "fetch_gpu_wheels: pip download FAILED (above); the set in $dest is incomplete" >&2
  exit 1
fi
rm -f "$log"

# exactly one wheel per pinned name, nothing else but mmcv
missing=0
for spec in "${WHEELS[@]}"; do
  name=${spec%%[=<>]*}; ver=${spec#*==}
  norm=${name//-/_}
  n=$(compgen -G "$dest/${norm}-${ver}-*.whl" | wc -l || true)
  if [ "$n" -ne 1 ]; then
    echo "fetch_gpu_wheels: expected one wheel $norm-$ver-*.whl in $dest, found $n" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
extra=$(ls "$dest"/*.whl | wc -l)
if [ "$extra" -ne $(( ${#WHEELS[@]} + 1 )) ]; then
  echo "fetch_gpu_wheels: $dest holds $extra wheels, expected $(( ${#WHEELS[@]} + 1 ))" \
       "(two versions of one package stop the install); empty it and re-run" >&2
  ls -1 "$dest" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $extra wheels for $tag in $dest ($(du -sh "$dest" | cut -f1)); mmcv: $(basename "$mmcv")"
