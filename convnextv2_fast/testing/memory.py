"""Count the bytes autograd saves for backward (activation memory).

Used by the fused-block tests (recompute must keep <= 8 B per block element)
and by ``benchmarks/bench_block.py``.
"""
import torch


class SavedTensorBytes:
    """Context manager: sum of the unique storages saved for backward.

    Parameters (and any tensor listed in ``exclude``) are not counted: they
    exist regardless of what autograd keeps.  Storages are deduplicated, so a
    tensor saved twice (or a view of a saved tensor) counts once.
    """

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen = set()
        self.bytes = 0

    def _pack(self, t):
        if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self._exclude and key not in self._seen and st.nbytes():
                self._seen.add(key)
                self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

