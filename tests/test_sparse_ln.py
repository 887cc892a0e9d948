"""The sparse encoder's LayerNorm over compact rows (convnextv2_fast/sparse/ln.py),
one Triton pass each way: interpreter parity of the output and every gradient
against ``F.layer_norm`` (fp64 reference, 2x rule against the same-dtype torch
error; fp32 and fp16 inputs, C not a power of two, rows across several
backward programs), bit-identical reruns, the encoder's output dtypes under
autocast, and the kernels compiled for sm_90 at the FCMAE V2-B shapes (no
spills; a subprocess with TRITON_INTERPRET=0)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip('triton')

from convnextv2_fast.testing import assert_close_to_ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ln(x, w, b, eps=1e-6):
    return F.layer_norm(x, (x.shape[1], ), w, b, eps)


def _grads(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('M,C', [(1, 5), (37, 24), (600, 130)])
def test_sparse_ln_matches_layer_norm(dtype, M, C):
    from convnextv2_fast.sparse.ln import sparse_layer_norm
    g = torch.Generator().manual_seed(M * C)
    x = (torch.randn(M, C, generator=g) * 3 + 1).to(dtype)
    w = torch.randn(C, generator=g)
    b = torch.randn(C, generator=g)
    dy = torch.randn(M, C, generator=g)
    cand = _grads(lambda x_, w_, b_: sparse_layer_norm(x_, w_, b_, 1e-6), x, w, b, dy)
    same = _grads(lambda x_, w_, b_: _ln(x_.float(), w_, b_).to(x_.dtype), x, w, b, dy)
    hi = _grads(lambda x_, w_, b_: _ln(x_, w_, b_), x.double(), w.double(), b.double(), dy)
    for name, c, s, h in zip(('out', 'dx', 'dweight', 'dbias'), cand, same, hi):
        assert c.dtype == s.dtype, name
        assert_close_to_ref(f'sparse_ln/{dtype}/{M}x{C}/{name}', c, s, h, dtype=dtype)
    again = _grads(lambda x_, w_, b_: sparse_layer_norm(x_, w_, b_, 1e-6), x, w, b, dy)
    for c, a in zip(cand, again):  # bit-identical (M = 600: several backward programs)
        assert torch.equal(c, a)


@pytest.mark.interpreter
def test_sparse_ln_out_dtype_and_wrong_stats_fail():
    """``out_dtype`` is honoured (fp32 input, fp16 out = the torch output cast);
    a kernel with the variance off by the mean would fail the check."""
    from convnextv2_fast.sparse.ln import sparse_ln_forward
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 48, generator=g) + 2
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    y, mean, rstd = sparse_ln_forward(x, w, b, 1e-6, torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, _ln(x, w, b).half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(rstd, (x.var(1, unbiased=False) + 1e-6).rsqrt())
    bad = (x - mean[:, None]) * (x.var(1, unbiased=True) + 1e-6).rsqrt()[:, None] * w + b
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y.float(), bad, rtol=1e-3, atol=1e-3)


@pytest.mark.interpreter
def test_encoder_ln_dtypes_under_autocast(monkeypatch):
    """With the Triton LNs (mlp_impl='triton') the block and downsample LNs
    write the autocast dtype (their only consumer is a GEMM autocast casts to
    it), the stem LN what F.layer_norm returns (fp32: the residual stream)."""
    from convnextv2_fast.models.sparse_encoder import SparseConvNeXtV2
    import convnextv2_fast.sparse.ln as ln_mod
    seen = []
    orig = ln_mod.sparse_layer_norm

    def spy(x, w, b, eps, out_dtype=None):
        y = orig(x, w, b, eps, out_dtype)
        seen.append(y.dtype)
        return y

    monkeypatch.setattr(ln_mod, 'sparse_layer_norm', spy)
    enc = SparseConvNeXtV2(arch='atto', mlp_impl='triton', dwconv_impl='torch').eval()
    x = torch.randn(2, 3, 64, 96)  # batch 2, H != W
    mask = torch.zeros(2, 2, 3)
    mask[:, 0, 0] = 1
    with torch.autocast('cpu', dtype=torch.float16):
        enc.forward_sparse(x, mask)
    # stem, then per stage: (downsample LN for i >= 1) + one LN per block
    expect = [torch.float32]
    for i, d in enumerate(enc.depths):
        expect += [torch.float16] * (d + (i >= 1))
    assert seen == expect


@pytest.mark.gpu
@pytest.mark.parametrize('M,C', [(77824, 128), (4864, 512), (1216, 1024)])
def test_cuda_sparse_ln_matches_layer_norm(M, C):
    """On the GPU at FCMAE V2-B stage shapes, bf16 rows: output (bf16 and
    fp32) and gradients against F.layer_norm in fp64 (2x rule against the
    autocast torch path: fp32 LN of the bf16 rows), bit-identical reruns."""
    from convnextv2_fast.sparse.ln import sparse_layer_norm
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(M, C, generator=g) * 2 + 0.5).bfloat16().cuda()
    w, b = torch.randn(C, generator=g).cuda(), torch.randn(C, generator=g).cuda()
    dy = torch.randn(M, C, generator=g).cuda()
    for out in (torch.bfloat16, torch.float32):
        cand = _grads(lambda x_, w_, b_: sparse_layer_norm(x_, w_, b_, 1e-6, out), x, w, b, dy)
        again = _grads(lambda x_, w_, b_: sparse_layer_norm(x_, w_, b_, 1e-6, out), x, w, b,
                       dy)
        same = _grads(lambda x_, w_, b_: _ln(x_.float(), w_, b_).to(out), x, w, b, dy)
        hi = _grads(lambda x_, w_, b_: _ln(x_, w_, b_), x.double(), w.double(), b.double(), dy)
        for name, c, a, s_, h in zip(('out', 'dx', 'dweight', 'dbias'), cand, again, same, hi):
            assert torch.equal(c, a), name
            assert_close_to_ref(f'cuda-sparse_ln/{M}x{C}/{out}/{name}', c.cpu(), s_.cpu(),
                                h.cpu(), dtype=torch.bfloat16)


# -- sm_90 compile of exactly what the GPU launches -------------------------------
def _heavy_main(out_path):
    import torch
    from benchmarks import shapes, sm90
    from convnextv2_fast.sparse.ln import sparse_ln_backward, sparse_ln_forward
    rows = []
    frac = shapes.fcmae_visible_fraction()
    for stage in shapes.fcmae_v2b_stages():
        M = int(round(stage.M * frac))
        x = torch.empty((M, stage.C), dtype=torch.bfloat16)
        w = torch.empty((stage.C, ), dtype=torch.float32)

        def run():
            y, mean, rstd = sparse_ln_forward(x, w, w, 1e-6, torch.bfloat16)
            sparse_ln_backward(y, x, w, mean, rstd)

        for L in sm90.capture_launches(run):
            r = L.row()
            r.pop('compiled', None)
            r['shape'] = stage.name
            rows.append(r)
    with open(out_path, 'w') as f:
        json.dump(rows, f, default=str)


def test_sparse_ln_kernels_pass_the_sm90_gate(tmp_path):
    from benchmarks import sm90
    if not sm90.have_ptxas():
        pytest.skip('Triton has no ptxas here (the sm_90 gates need it)')
    out = tmp_path / 'ln.json'
    env = dict(os.environ, TRITON_INTERPRET='0',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert {r['kernel'] for r in rows} == {'_ln_fwd_kernel', '_ln_bwd_kernel'}
    assert len(rows) == 8  # 4 stages x fwd, bwd
    for r in rows:  # every launch fills the GPU: >= 1.5 programs per SM
        assert r['programs'] >= 198, r
        print(r['shape'], r['kernel'], r.get('regs'), r.get('num_warps'),
              r.get('programs'), r.get('spill_store_B'))
    assert not sm90.gate_failures(rows), sm90.gate_failures(rows)


if __name__ == '__main__':
    _heavy_main(sys.argv[1])
