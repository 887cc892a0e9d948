"""Make ``torch.utils.cpp_extension`` CUDA builds work where nvcc is a wrapper.

On machines whose ``nvcc`` on PATH is a small wrapper script (no GPU, CUDA
toolkit without the math-library headers), two things break PyTorch's CUDA
extension builds (see README, "Building without a GPU"):

1. PyTorch guesses ``CUDA_HOME`` as the folder above ``which nvcc``; the real
   root is what nvcc reports in ``nvcc -dryrun`` (``#$ TOP=<root>/bin/..``).
2. ``ATen/cuda/CUDAContext.h`` includes ``cublas_v2.h``/``cusparse.h``, which
   only the ``nvidia/cu*/include`` folders of torch's pip dependencies ship.

Used by ``setup.py`` (our extension) and ``tools/install_mmcv.py`` (mmcv).
Standard library only.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess


def nvcc_cuda_home():
    """CUDA root as nvcc reports it, or None when nvcc is absent/silent."""
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, '-dryrun', '-c', '-x', 'cu', os.devnull, '-o', os.devnull],
            capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'^#\$ TOP=(.+)$', out.stdout + out.stderr, re.M)
    return os.path.realpath(match.group(1).strip()) if match else None


def nvidia_pip_includes():
    """Include dirs of the CUDA headers shipped by torch's nvidia pip deps."""
    spec = importlib.util.find_spec('nvidia')
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, '*', 'include')))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def apply(env=os.environ):
    """Set CUDA_HOME (if unset) in ``env``; return the extra include dirs."""
    if not env.get('CUDA_HOME'):
        home = nvcc_cuda_home()
        if home:
            env['CUDA_HOME'] = home
    return nvidia_pip_includes()
