"""Compile every Triton kernel of the fused block for an sm_90 (H100) target
without a GPU: the interpreter tests do not exercise Triton's compiler
(constexpr handling, type checking, layouts), this does, down to the cubin.
"""
import os

import pytest

triton = pytest.importorskip('triton')

P, PB, I, C = '*fp32', '*bf16', 'i32', 'constexpr'


def _dw(kernel, values=False):
    """The dwconv kernels' constexprs as the host launches them (stage-2
    shape of V2-B at 1024^2, N=2): names -> 'constexpr', or their values."""
    from convnextv2_fast.ops import dwconv_ln as d
    meta = d.launch_config(kernel, 2, 128, 128, 256, gpu=True).meta
    return dict(meta) if values else {k: C for k in meta}


def _kernels():
    from convnextv2_fast.ops import dwconv_ln as d
    from convnextv2_fast.ops import gelu_grn as g
    from convnextv2_fast.ops import layer_scale_residual as r
    fwd = [
        ('dwconv_ln_fwd', d._dwconv_ln_fwd_kernel,
         dict(X=PB, Wt=P, B=P, LNW=P, LNB=P, Z=PB, MEAN=P, RSTD=P, H=I, W=I,
              C=I, eps='fp32', **_dw('fwd')), _dw('fwd', True)),
        ('gelu_sumsq', g._gelu_sumsq_kernel,
         dict(Hp=PB, U=PB, PART=P, HW=I, K=I, BLOCK_P=C, BLOCK_K=C),
         dict(BLOCK_P=64, BLOCK_K=64)),
        ('scale_residual', r._scale_residual_kernel,
         dict(A=PB, R=P, RES=P, OUT=P, A2=PB, PART=P, HW=I, C=I, HAS_RES=C,
              HAS_DR=C, BLOCK_P=C, BLOCK_C=C),
         dict(HAS_RES=True, HAS_DR=False, BLOCK_P=32, BLOCK_C=128)),
    ]
    bwd = [
        ('dwconv_ln_bwd', d._dwconv_ln_bwd_kernel,
         dict(X=PB, Wt=P, B=P, LNW=P, DZ=PB, MEAN=P, RSTD=P, DY=PB, PART=P,
              H=I, W=I, C=I, **_dw('ln_bwd')), _dw('ln_bwd', True)),
        ('dwconv_dgrad', d._dwconv_dgrad_kernel,
         dict(DY=PB, Wt=P, RES=PB, DX=PB, H=I, W=I, C=I, **_dw('dgrad')),
         _dw('dgrad', True)),
        ('dwconv_wgrad', d._dwconv_wgrad_kernel,
         dict(X=PB, DY=PB, PART=P, H=I, W=I, C=I, NUM_TILES=I, G=I,
              **_dw('wgrad')), _dw('wgrad', True)),
        ('grn_bwd_reduce', g._grn_bwd_reduce_kernel,
         dict(Hp=PB, DV=PB, U=PB, PART=P, HW=I, K=I, BLOCK_P=C, BLOCK_K=C),
         dict(BLOCK_P=64, BLOCK_K=64)),
        ('grn_bwd_apply', g._grn_bwd_apply_kernel,
         dict(Hp=PB, DV=PB, SCALE=P, T=P, DH=PB, HW=I, K=I, BLOCK_P=C,
              BLOCK_K=C),
         dict(BLOCK_P=64, BLOCK_K=64)),
        ('scale_residual_dr', r._scale_residual_kernel,
         dict(A=PB, R=P, RES=P, OUT=PB, A2=PB, PART=P, HW=I, C=I, HAS_RES=C,
              HAS_DR=C, BLOCK_P=C, BLOCK_C=C),
         dict(HAS_RES=False, HAS_DR=True, BLOCK_P=32, BLOCK_C=128)),
    ]
    return fwd, bwd


def _compile(fn, sig, consts):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not hasattr(fn, 'src') or type(fn).__name__ == 'InterpretedFunction':
        fn = getattr(fn, 'fn', fn)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget('cuda', 90, 32))
    assert 'cubin' in k.asm and len(k.asm['cubin']) > 0


def _have_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
        return True
    except Exception:
        return False


@pytest.mark.parametrize('which', [
    0, pytest.param(1, marks=pytest.mark.slow)], ids=['forward', 'backward'])
def test_kernels_compile_for_sm90(which):
    """Runs in a subprocess: the kernels must be created with
    TRITON_INTERPRET=0 (this test process uses the interpreter)."""
    if not _have_ptxas():
        pytest.skip('Triton has no ptxas here')
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET='0',
               PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                           str(which)], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count('compiled') == len(_kernels()[which])


if __name__ == '__main__':
    import sys
    for name, fn, sig, consts in _kernels()[int(sys.argv[1])]:
        _compile(fn, sig, consts)
        print('compiled', name, flush=True)
