#!/usr/bin/env bash
# Collect the wheels a GPU machine without network needs for the OpenMMLab
# stack (its image has torch, triton, numpy, scipy, matplotlib, opencv, ...
# but no mmcv/mmengine/mmdet/mmpretrain/pycocotools), for Python 3.12 x86-64.
#
#   bash tools/fetch_gpu_wheels.sh DEST [MMCV_WHEELHOUSE]
#
# DEST gets: the mmcv CUDA wheel from MMCV_WHEELHOUSE/gpu/ (default
# ../shared/wheels; build one with `python tools/install_mmcv.py --cuda 1`),
# plus pure-Python/manylinux wheels of the rest from PyPI.  Then, on the GPU
# machine: bash tools/gpu_check.sh DEST
set -euo pipefail
dest=${1:?usage: fetch_gpu_wheels.sh DEST [MMCV_WHEELHOUSE]}
house=${2:-${MMCV_WHEELHOUSE:-../shared/wheels}}
mkdir -p "$dest"
mmcv=$(ls "$house"/gpu/mmcv-2.1.0-cp312-cp312-*x86_64.whl 2>/dev/null | head -1 || true)
if [ -z "$mmcv" ]; then
  echo "no mmcv 2.1.0 cp312 CUDA wheel in $house/gpu/ (build it with tools/install_mmcv.py --cuda 1)" >&2
  exit 1
fi
cp "$mmcv" "$dest/"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64; do
  plat+=(--platform "$p")
done
# one version of each; no deps (the image already has numpy, scipy, ...)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d "$dest" \
  mmengine==0.10.7 mmdet==3.3.0 mmpretrain==1.2.0 pycocotools addict yapf \
  termcolor terminaltables shapely modelindex ordered-set mat4py \
  'setuptools<81' 2>&1 | grep -v "^WARNING: Location" || true
ls -1 "$dest"
