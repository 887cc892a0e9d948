"""A TorchDispatchMode that logs every aten op at the dispatcher (name, input
and output shapes/dtypes, and whether it copies memory), for the tests that
show a pass, a temporary, a cast or a layout copy is gone.

Ops issued by Triton's CPU interpreter itself (it moves kernel arguments
around) are not the program's and are left out.  Only metadata is kept (no
tensor references: holding outputs would change autograd's grad-stealing).
"""
import sys
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops that normalise over the last dim / convolve: they copy a non-contiguous
# input inside the kernel, out of the dispatcher's sight
_HIDDEN_COPY_OPS = ('aten.native_layer_norm', 'aten.native_layer_norm_backward',
                    'aten.convolution', 'aten.convolution_backward')


@dataclass
class Op:
    name: str
    inputs: List[Tuple[tuple, torch.dtype]]
    outputs: List[Tuple[tuple, torch.dtype]]
    copy: str = ''  # '', 'copy' (clone/copy_/same-dtype _to_copy),
    # 'cast' (_to_copy to another dtype) or 'hidden' (see _HIDDEN_COPY_OPS)
    args: list = field(default_factory=list)  # non-tensor args
    view: bool = False  # returns an alias of an input (no new memory)


def _from_triton_interpreter() -> bool:
    f = sys._getframe(1)
    while f is not None:
        if '/triton/' in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def _dense(t) -> bool:
    return t.is_contiguous() or t.is_contiguous(
        memory_format=torch.channels_last)


def _classify(name, args, kwargs, out):
    a0 = args[0] if args and torch.is_tensor(args[0]) else None
    if name in ('aten.clone', 'aten.copy_'):
        return 'copy'
    if name == 'aten._to_copy' and a0 is not None:
        same = kwargs.get('dtype', a0.dtype) == a0.dtype
        return 'copy' if same else 'cast'
    if name in _HIDDEN_COPY_OPS and a0 is not None:
        first = a0
        if not (first.is_contiguous() if 'layer_norm' in name
                else _dense(first)):
            return 'hidden'
    return ''


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _from_triton_interpreter():
            name = str(func.overloadpacket)
            meta = [(tuple(t.shape), t.dtype) for t in tree_leaves(args)
                    if torch.is_tensor(t)]
            outs = [(tuple(t.shape), t.dtype) for t in tree_leaves(out)
                    if torch.is_tensor(t)]
            view = any(r.alias_info is not None
                       for r in func._schema.returns)
            self.ops.append(Op(name, meta, outs,
                               _classify(name, args, kwargs, out),
                               [a for a in args if not torch.is_tensor(a)],
                               view))
        return out

    # -- queries ----------------------------------------------------------
    def named(self, name):
        return [o for o in self.ops if o.name == name]

    def copies(self, kinds=('copy', 'hidden')):
        return [o for o in self.ops if o.copy in kinds]

    def new_tensors(self):
        """(op name, shape, dtype) of every tensor an op allocated (views and
        in-place results left out)."""
        return [(o.name, s, d) for o in self.ops if not o.view
                for s, d in o.outputs]
