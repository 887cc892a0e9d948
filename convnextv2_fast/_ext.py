"""Optional compiled extension ``convnextv2_fast._C`` (xformers ``_cpp_lib`` style).

Importing the package never fails because of the extension: a missing or
broken build is recorded here, reported by ``python -m convnextv2_fast.info``
and warned about once when an op that needs it is first used.
"""
import importlib
import warnings
from typing import Optional, Tuple

_STATE = {'loaded': None, 'module': None, 'reason': None, 'warned': False}


def _load() -> None:
    if _STATE['loaded'] is not None:
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        module = importlib.import_module('convnextv2_fast._C')
    except Exception as exc:  # ImportError, OSError (bad .so), ...
        _STATE.update(loaded=False, module=None,
                      reason=f'{type(exc).__name__}: {exc}')
    else:
        _STATE.update(loaded=True, module=module, reason=None)


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
