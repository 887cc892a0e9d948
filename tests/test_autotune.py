"""The measured ``impl='auto'`` choice (convnextv2_fast.autotune), on a CPU:
the timer is injected, both paths really run (the fused one in the Triton
interpreter), and the choice is cached per device on disk."""
import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from convnextv2_fast import autotune
from convnextv2_fast.models import ConvNeXtV2Block

pytestmark = pytest.mark.interpreter


class FakeTimer:
    """Runs ``fn`` once (so both paths execute) and returns a scripted time:
    the fused path is recognised by the Triton launches it makes."""

    def __init__(self, fused_ms, reference_ms, mlp_ms=None):
        self.times = dict(triton=fused_ms, reference=reference_ms,
                          triton_mlp=fused_ms + 1 if mlp_ms is None
                          else mlp_ms)
        self.calls = []

    def __call__(self, fn, device):
        import convnextv2_fast.ops.fused_block as fb
        seen = []
        real = fb.fused_block
        fb.fused_block = lambda *a, **k: seen.append(k['mlp']) or real(*a,
                                                                     **k)
        try:
            fn()
        finally:
            fb.fused_block = real
        path = autotune.MLP_PATH[seen[0]] if seen else 'reference'
        self.calls.append(path)
        return self.times[path]


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.TUNE_ENV, raising=False)
    autotune.clear_memory_cache()
    yield tmp_path
    autotune.set_timer(None)
    autotune.clear_memory_cache()


def _block(seed=0):
    torch.manual_seed(seed)
    block = ConvNeXtV2Block(8, use_grn=True, layer_scale_init_value=0.,
                            drop_path_rate=0.3, impl='triton')
    with torch.no_grad():
        block.grn.gamma.normal_()
        block.grn.beta.normal_()
    return block.train()


def _x(N=2, C=8, H=5, W=7):
    return torch.randn(N, C, H, W).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize('fused_ms,ref_ms,mlp_ms,want', [
    (1.0, 2.0, 3.0, 'triton'), (3.0, 2.0, 4.0, 'reference'),
    (3.0, 2.0, 1.5, 'triton_mlp')])
def test_choice_follows_the_timer_and_is_cached(tuner, fused_ms, ref_ms,
                                                mlp_ms, want):
    timer = FakeTimer(fused_ms, ref_ms, mlp_ms)
    autotune.set_timer(timer)
    block, x = _block(), _x()
    assert autotune.choose(block, x, torch.float32, training=True) == want
    assert sorted(timer.calls) == ['reference', 'triton', 'triton_mlp']
    # cached in memory: no second timing
    assert autotune.choose(block, x, torch.float32, training=True) == want
    assert len(timer.calls) == 3
    # cached on disk: a new process (memory cleared) does not time again
    autotune.clear_memory_cache()
    assert autotune.choose(block, x, torch.float32, training=True) == want
    assert len(timer.calls) == 3
    with open(os.path.join(tuner, autotune.CACHE_FILE)) as f:
        data = json.load(f)
    (entry, ) = data['cpu'].values()
    assert entry['choice'] == want
    assert (entry['fused_ms'], entry['reference_ms']) == (
        min(fused_ms, mlp_ms), ref_ms)
    assert entry['times_ms'] == dict(triton=fused_ms, triton_mlp=mlp_ms)
    assert want in autotune.describe()


@pytest.mark.parametrize('fixed', ['cublas', 'triton'])
@pytest.mark.parametrize('how', ['attribute', 'env'])
def test_a_fixed_mlp_is_the_only_fused_path_timed(tuner, monkeypatch, fixed,
                                                  how):
    timer = FakeTimer(1.0, 5.0, 0.5)
    autotune.set_timer(timer)
    block = _block()
    if how == 'attribute':
        block.fused_mlp = fixed
    else:
        monkeypatch.setenv('CONVNEXTV2_FAST_MLP', fixed)
    choice = autotune.choose(block, _x(), torch.float32, training=True)
    assert choice == autotune.MLP_PATH[fixed]
    assert sorted(timer.calls) == sorted(['reference', choice])
    (key, ) = autotune.cached_choices('cpu')['cpu']
    assert f'mlp:{fixed}' in key


def test_keys_separate_size_bucket_dtype_and_mode(tuner):
    timer = FakeTimer(1.0, 2.0)
    autotune.set_timer(timer)
    block = _block()
    autotune.choose(block, _x(), torch.float32, training=True)
    autotune.choose(block, _x(), torch.float32, training=False)
    autotune.choose(block, _x(H=10), torch.float32, training=False)
    autotune.choose(block, _x(), torch.float16, training=False)
    assert len(timer.calls) == 12
    # same pixel bucket (2*6*7 = 84 and 2*5*7 = 70 -> 128): no new timing
    autotune.choose(block, _x(H=6), torch.float32, training=False)
    assert len(timer.calls) == 12
    keys = autotune.cached_choices('cpu')['cpu']
    assert len(keys) == 4
    import triton
    import convnextv2_fast
    for k in keys:  # new package / Triton / torch versions time again
        assert convnextv2_fast.__version__ in k and triton.__version__ in k
        assert torch.__version__ in k
    assert autotune.size_bucket(70) == autotune.size_bucket(128) == 128
    assert autotune.size_bucket(129) == 256


def test_not_timed_under_saved_tensor_hooks(tuner):
    """e.g. inside activation checkpointing or offloading: fused, nothing
    timed, nothing cached."""
    timer = FakeTimer(9.0, 1.0)
    autotune.set_timer(timer)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert autotune.choose(_block(), _x(), torch.float32, True) == \
            'triton'
    assert timer.calls == []
    assert autotune.cached_choices('cpu') == {'cpu': {}}


def test_with_cp_decides_the_path_once_outside_the_checkpoint(monkeypatch):
    """The path is chosen before checkpointing, so the recomputation in
    backward reuses it and never tunes under the checkpoint's hooks."""
    block = _block()
    block.with_cp = True
    calls = []
    real = block._use_fused

    def spy(x):
        calls.append(torch._C._autograd._top_saved_tensors_default_hooks(
            False) is None)
        return real(x)

    monkeypatch.setattr(block, '_use_fused', spy)
    x = _x().requires_grad_()
    block(x).sum().backward()
    assert calls == [True]  # once, outside any saved-tensor hooks
    assert x.grad is not None


def test_tuning_leaves_grads_and_rng_untouched(tuner):
    autotune.set_timer(FakeTimer(1.0, 2.0))
    block, x = _block(), _x()
    rng = torch.get_rng_state()
    autotune.choose(block, x, torch.float32, training=True)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in block.parameters())


def test_tuning_off_uses_fused_and_caches_nothing(tuner, monkeypatch):
    monkeypatch.setenv(autotune.TUNE_ENV, '0')
    timer = FakeTimer(9.0, 1.0)
    autotune.set_timer(timer)
    assert autotune.choose(_block(), _x(), torch.float32, True) == 'triton'
    assert timer.calls == []
    assert autotune.cached_choices('cpu') == {'cpu': {}}
    assert 'tuning off' in autotune.describe()


def test_a_failing_path_loses(tuner, monkeypatch):
    autotune.set_timer(autotune._cuda_event_timer)  # the real timer, host clock
    block = _block()

    def broken(x, mlp=None):
        raise RuntimeError('kernel launch failed')

    monkeypatch.setattr(block, '_fused_forward', broken)
    with pytest.warns(RuntimeWarning, match='kernel launch failed'):
        choice = autotune.choose(block, _x(), torch.float32, training=False)
    assert choice == 'reference'
    # a failure decides this process only: nothing written to disk
    assert not os.path.exists(os.path.join(tuner, autotune.CACHE_FILE))


def test_block_auto_on_cuda_routes_through_the_tuner(tuner, monkeypatch):
    """Fake CUDA tensors: fp64 falls back to the reference without tuning;
    fp32 asks the tuner and follows it."""
    asked = []
    monkeypatch.setattr(autotune, 'choose',
                        lambda b, x, cd, tr: asked.append(x.dtype) or 'reference')
    block = _block()
    block.impl = 'auto'
    monkeypatch.delenv('CONVNEXTV2_FAST_IMPL', raising=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x64 = torch.empty(2, 8, 5, 7, device='cuda', dtype=torch.float64)
        x32 = torch.empty(2, 8, 5, 7, device='cuda')
        assert not block._use_fused(x64)
        assert asked == []
        assert not block._use_fused(x32)
        assert asked == [torch.float32]
        monkeypatch.setattr(autotune, 'choose', lambda *a: 'triton')
        assert block._use_fused(x32)
    # impl='triton' is an explicit request: no tuning
    block.impl = 'triton'
    with FakeTensorMode(allow_non_fake_inputs=True):
        monkeypatch.setattr(autotune, 'choose', lambda *a: 1 / 0)
        assert block._use_fused(torch.empty(2, 8, 5, 7, device='cuda'))


def test_fp64_parameters_are_not_fused():
    block = _block().double()
    assert not block.fused_supported()
