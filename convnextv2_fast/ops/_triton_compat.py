"""Compatibility fixes for the Triton versions the project meets.

Triton 3.6's CPU interpreter turns a scalar (a 1-element array) into a Python
int with ``int(self.handle.data)`` (``tl.tensor.__index__``, e.g. ``range(n)``
over a kernel argument); numpy >= 2.4 refuses ``int()`` of a 1-D array ("only
0-dimensional arrays can be converted to Python scalars").  Triton 3.8 squeezes
first.  :func:`apply` (run on import) gives older interpreters the same ``__index__``; it is a
no-op where the installed Triton already squeezes or has no interpreter hook.
Nothing here touches CUDA or the compiled path.
"""
import inspect

_BROKEN = 'int(self.handle.data))'


def _needs_index_fix(fn) -> bool:
    try:
        return _BROKEN in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def apply() -> bool:
    """Patch ``triton.runtime.interpreter`` if needed; True if it patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    orig = getattr(interpreter, '_patch_lang_tensor', None)
    if orig is None or getattr(orig, '_squeezes_index', False) or \
            not _needs_index_fix(orig):
        return False

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        # the scope restores attributes last-in first-out: this one first
        scope.set_attr(tensor, '__index__',
                       lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._squeezes_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


APPLIED = apply()
