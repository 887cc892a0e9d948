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


# --- CUDA architectures -----------------------------------------------------
# Default when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a CI runner,
# a container build host): the architectures this torch build ships kernels
# for, from Volta (7.0) on, plus at least REQUIRED_ARCHS, kept to those nvcc can
# compile, with PTX for the newest (forward-compatible with future GPUs).
MIN_DEFAULT_ARCH = (7, 0)
REQUIRED_ARCHS = ('8.0', '8.6', '8.9', '9.0')


def _arch_key(arch):
    """'8.6' / '9.0a' / '9.0+PTX' -> (8, 6) for sorting and comparison."""
    major, minor = arch.split('+')[0].rstrip('a').split('.')
    return int(major), int(minor)


def _sm_to_arch(token):
    """'sm_86' / 'compute_90' / 'sm_90a' -> '8.6' / '9.0' / '9.0' (or None)."""
    match = re.fullmatch(r'(?:sm|compute)_(\d+)(\d)a?', token.strip())
    return f'{match.group(1)}.{match.group(2)}' if match else None


def nvcc_archs():
    """Architectures ``nvcc --list-gpu-arch`` can target, or None if unknown."""
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, '--list-gpu-arch'], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    archs = [_sm_to_arch(t) for t in out.stdout.split()]
    archs = [a for a in archs if a]
    return archs or None


def default_arch_list(torch_archs, compilable=None):
    """The default ``TORCH_CUDA_ARCH_LIST`` (``;``-separated) for a build without a GPU.

    ``torch_archs``: tokens of torch's own build (``torch.cuda.get_arch_list()``,
    e.g. ``['sm_75', 'sm_80', ..., 'sm_120']``); ``compilable``: archs nvcc can
    target (``nvcc_archs()``) or None to keep all.
    """
    archs = {_sm_to_arch(t) for t in torch_archs} - {None}
    archs = {a for a in archs if _arch_key(a) >= MIN_DEFAULT_ARCH}
    archs |= set(REQUIRED_ARCHS)
    if compilable is not None:
        archs &= set(compilable)
    if not archs:
        raise RuntimeError(
            'convnextv2_fast: no CUDA architecture is both supported by this torch '
            f'build ({torch_archs}) and compilable by nvcc ({compilable}); set '
            'TORCH_CUDA_ARCH_LIST')
    ordered = sorted(archs, key=_arch_key)
    ordered[-1] += '+PTX'
    return ';'.join(ordered)


def visible_gpu_arch_list(capabilities, torch_archs):
    """What torch itself builds for with GPUs visible and no TORCH_CUDA_ARCH_LIST:
    each visible capability (clamped to torch's newest), the newest with PTX."""
    newest = max((_arch_key(a) for a in map(_sm_to_arch, torch_archs) if a),
                 default=None)
    archs = set()
    for cap in capabilities:
        cap = tuple(cap)
        if newest is not None:
            cap = min(cap, newest)
        archs.add(f'{cap[0]}.{cap[1]}')
    ordered = sorted(archs, key=_arch_key)
    ordered[-1] += '+PTX'
    return ';'.join(ordered)


def normalize_arch_list(value):
    """TORCH_CUDA_ARCH_LIST as torch reads it (``;`` or space separated) -> ``a;b;c``."""
    return ';'.join(t for t in re.split(r'[;\s]+', value.strip()) if t)


def torch_arch_tokens(torch):
    """The ``sm_XY`` list this torch build ships kernels for (no GPU needed)."""
    archs = list(torch.cuda.get_arch_list())
    if not archs and hasattr(torch._C, '_cuda_getArchFlags'):
        archs = (torch._C._cuda_getArchFlags() or '').split()
    return archs


def resolve_arch_list(torch, env=os.environ):
    """(arch list, why) that ``setup.py`` builds the CUDA extension for.

    ``TORCH_CUDA_ARCH_LIST`` when set; else the visible GPUs (torch's own
    default); else :func:`default_arch_list` (torch's stock helper would fail
    with an IndexError there: no GPU, nothing to build for).
    """
    given = env.get('TORCH_CUDA_ARCH_LIST', '').strip()
    if given and given != 'native':
        return normalize_arch_list(given), 'TORCH_CUDA_ARCH_LIST'
    torch_archs = torch_arch_tokens(torch)
    caps = [torch.cuda.get_device_capability(i)
            for i in range(torch.cuda.device_count())]
    if caps:
        return visible_gpu_arch_list(caps, torch_archs), 'the visible GPUs'
    return (default_arch_list(torch_archs, nvcc_archs()),
            'default: TORCH_CUDA_ARCH_LIST unset and no GPU visible; torch ships '
            f'{" ".join(torch_archs) or "no archs"}')
