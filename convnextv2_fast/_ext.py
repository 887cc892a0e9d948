"""Optional compiled extension ``convnextv2_fast._C`` (xformers ``_cpp_lib`` style).

Importing the package never fails because of the extension: a missing, broken
or mismatched build is recorded here, reported by ``python -m
convnextv2_fast.info`` and warned about once when an op that needs it is first
used; callers then take their pure-PyTorch paths.

Torch mismatch.  ``setup.py`` compiles a build stamp into ``_C`` (package,
torch and CUDA versions, CUDA architectures; see ``csrc/bindings.cpp``).  An
extension compiled against another torch -- typically by ``pip install`` in an
isolated build environment that resolved a different torch -- can fail to
import with an undefined symbol, or load and crash later (the C++ ABI of torch
is not stable across versions).  So the stamp is read from the shared library
*file* (a NUL-terminated ``CONVNEXTV2_FAST_BUILD_STAMP=<json>`` string in its
read-only data) before anything imports it, compared with the running torch,
and a mismatched build is never loaded.  The stamp lives in the binary itself,
not in a sidecar file, so it cannot be lost or go stale when only the ``.so``
is copied or rebuilt.
"""
import importlib
import importlib.util
import json
import mmap
import warnings
from typing import Optional, Tuple

STAMP_MARKER = b'CONVNEXTV2_FAST_BUILD_STAMP='
FIX_HINT = ('rebuild it against the installed torch: `pip install '
            '--no-build-isolation --no-cache-dir --force-reinstall --no-deps <path to '
            'convnextv2_fast source or sdist>` (see README, "Install")')

_STATE = {'loaded': None, 'module': None, 'reason': None, 'warned': False,
          'stamp': None, 'path': None}


def read_build_stamp(path: str) -> Optional[dict]:
    """The build stamp compiled into the shared library at ``path`` (no import).

    None when the file has no stamp (built before stamps existed, or outside
    ``setup.py``); ``{}`` for a build made without the generated stamp header.
    """
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 0
        while True:
            at = mm.find(STAMP_MARKER, start)
            if at < 0:
                return None
            begin = at + len(STAMP_MARKER)
            end = mm.find(b'\0', begin, begin + 65536)
            start = begin
            if end < 0 or mm[begin:begin + 1] != b'{':
                continue
            try:
                stamp = json.loads(mm[begin:end].decode('ascii'))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(stamp, dict):
                return stamp


def stamp_mismatch(stamp: Optional[dict]) -> Optional[str]:
    """Why a build with ``stamp`` must not be loaded into this process, or None."""
    import torch
    if not stamp:  # unknown provenance: loaded as before (reported by info)
        return None
    built = (stamp.get('torch'), stamp.get('torch_cuda'))
    running = (torch.__version__, torch.version.cuda)
    if built == running:
        return None
    return (f'built for torch {built[0]} (CUDA {built[1]}) but running torch '
            f'{running[0]} (CUDA {running[1]}); not loaded -- {FIX_HINT}')


def _load() -> None:
    if _STATE['loaded'] is not None:
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        spec = importlib.util.find_spec('convnextv2_fast._C')
        if spec is None or not spec.origin:
            raise ImportError('convnextv2_fast._C is not built (install with '
                              '`pip install --no-build-isolation .`)')
        _STATE['path'] = spec.origin
        _STATE['stamp'] = stamp = read_build_stamp(spec.origin)
        mismatch = stamp_mismatch(stamp)
        if mismatch:
            _STATE.update(loaded=False, module=None, reason=mismatch)
            return
        module = importlib.import_module('convnextv2_fast._C')
    except Exception as exc:  # ImportError, OSError (bad .so), ...
        _STATE.update(loaded=False, module=None,
                      reason=f'{type(exc).__name__}: {exc}')
    else:
        _STATE.update(loaded=True, module=module, reason=None)


def build_stamp() -> Optional[dict]:
    """The stamp of the extension file found (loaded or refused), or None."""
    _load()
    return _STATE['stamp']


def describe_build(stamp: Optional[dict]) -> str:
    """One line for ``info``: what the extension was built against and for."""
    if stamp is None:
        return 'no build stamp (built before stamps existed or outside setup.py)'
    if not stamp:
        return 'empty build stamp (built without setup.py)'
    archs = (f'CUDA archs {stamp.get("cuda_arch_list")} (nvcc {stamp.get("nvcc")})'
             if stamp.get('with_cuda') else 'C++ only, no CUDA kernels')
    return (f'convnextv2_fast {stamp.get("convnextv2_fast")}, torch {stamp.get("torch")} '
            f'(CUDA {stamp.get("torch_cuda")}), {archs}')


def extension_status() -> Tuple[bool, str]:
    """(loaded, description) of the compiled extension."""
    _load()
    if _STATE['loaded']:
        module = _STATE['module']
        cuda = getattr(module, 'WITH_CUDA', None)
        where = {True: 'C++ + CUDA', False: 'C++ only'}.get(cuda, 'C++')
        return True, f'loaded from {module.__file__} ({where})'
    return False, f'not loaded ({_STATE["reason"]})'


def get_extension(purpose: str = '') -> Optional[object]:
    """The extension module, or None with a one-time warning naming ``purpose``."""
    _load()
    if not _STATE['loaded'] and not _STATE['warned']:
        _STATE['warned'] = True
        warnings.warn(
            'convnextv2_fast: compiled extension unavailable '
            f'({_STATE["reason"]}); {purpose or "falling back"} uses the '
            'pure-PyTorch reference path.', RuntimeWarning, stacklevel=2)
    return _STATE['module']
