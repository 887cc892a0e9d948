"""Build, on a CPU machine, the sm_90 Triton cache a GPU visit will use.

    # warm (run with the GPU's Triton: the replica's python for triton 3.6)
    python tools/warm_triton_cache.py warm --area block --cache DIR
    # on the GPU machine (tools/gpu_check.sh does these)
    python tools/warm_triton_cache.py relocate DIR
    python tools/warm_triton_cache.py report DIR LOOKUP_LOG
    # what gpu_check.sh runs for an area
    python tools/warm_triton_cache.py show --area block tests|suites|budget

How the warmer knows what the visit launches: it runs the SAME code the visit
runs, here, on CPU tensors -- the area's GPU tests (``pytest -m gpu`` on the
area's files, in-process) and the area's benchmark suites (``run_suite`` at
full size, the providers that launch the project's kernels) -- inside a
"pretend CUDA" context (:func:`pretend_cuda`: ``'cuda'`` devices and
``.cuda()`` land on the CPU, ``torch.autocast('cuda')`` is CPU autocast,
``torch.cuda`` queries answer as one idle GPU, ``impl='auto'`` resolves as for
CUDA tensors and tunes on first use, timing -- so launching -- every path, as
on the visit's fresh machine) and under :func:`benchmarks.sm90.capture_launches` (stand-in
sm_90 driver; every launch is specialised exactly as on the GPU and compiled
into ``TRITON_CACHE_DIR``; big torch ops are skipped).  No list of shapes is
restated: a new GPU test or benchmark shape is warmed automatically.  The
tests' assertions fail on the garbage values and are ignored; any other
exception means the capture may be incomplete and fails the warm run.
Exception: the Mask R-CNN suite trains a whole detector; its heads launch no
project kernel, so the warmer drives only the suite's backbone, built from
the suite's own config, at the suite's batches and AMP dtypes.

The cache is then pruned to what the runtime loads (``<kernel>.json``,
``<kernel>.cubin`` and the ``__grp__`` index, whose absolute paths
:func:`relocate` rewrites where the cache lands) and a ``manifest.json``
records every (key, kernel) the area needs.  It only hits for the same Triton
version and kernel source: build it from the commit that travels.
"""
import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One area per GPU visit.  Budgets (seconds) are the per-step time limits of
# tools/gpu_check.sh; they add up to <= 480 s (the command's 600 s limit
# minus a margin; the machine start comes on top, outside the command).
AREAS = {
    'block': dict(
        tests=['tests/test_fused_block.py', 'tests/test_ops_dwconv_ln.py',
               'tests/test_ops_grn.py', 'tests/test_ops_grn_stats.py'],
        suites=['block'],
        budget=dict(install=30, build=150, tests=120, bench=170)),
    'fcmae': dict(
        tests=['tests/test_sparse_dwconv.py', 'tests/test_sparse_dwconv_tiles.py',
               'tests/test_sparse_dwconv_tile_wgrad.py', 'tests/test_sparse_dwconv_mma.py',
               'tests/test_sparse_dwconv_skip.py', 'tests/test_sparse_encoder.py',
               'tests/test_fcmae.py', 'tests/test_sparse_mlp.py', 'tests/test_sparse_ln.py'],
        suites=['fcmae', 'sparse_dwconv'],
        budget=dict(install=30, build=150, tests=120, bench=170)),
    'maskrcnn': dict(
        tests=['tests/test_backbone.py', 'tests/test_mmdet.py',
               'tests/test_mmpretrain.py'],
        suites=['backbone', 'maskrcnn'],
        budget=dict(install=30, build=150, tests=60, bench=230)),
}
KEEP_SUFFIXES = ('.json', '.cubin')  # what CompiledKernel loads at run time
FAST_PROVIDERS = ['fast']  # suites add their variants (fast_recompute)


# --------------------------------------------------------------------------
# pretend CUDA: the visit's host code, on CPU tensors
# --------------------------------------------------------------------------
def _cpu_device(v):
    import torch
    if isinstance(v, str) and v.startswith('cuda'):
        return 'cpu'
    if isinstance(v, torch.device) and v.type == 'cuda':
        return torch.device('cpu')
    return v


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, *a):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.0


@contextlib.contextmanager
def pretend_cuda():
    """Run code written for a CUDA device with its tensors on the CPU."""
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, '__name__', '')
            if name == 'cuda':  # Tensor.cuda()
                return args[0]
            if name == 'to' or 'device' in kwargs:
                args = tuple(_cpu_device(a) for a in args)
                if 'device' in kwargs:
                    kwargs = dict(kwargs, device=_cpu_device(kwargs['device']))
            return func(*args, **kwargs)

    orig_autocast = torch.amp.autocast_mode.autocast

    class autocast(orig_autocast):  # noqa: N801 (torch's name)
        def __init__(self, device_type='cuda', *a, **k):
            super().__init__('cpu' if device_type == 'cuda' else device_type,
                             *a, **k)

    cuda_stubs = dict(
        is_available=lambda: True, device_count=lambda: 1,
        current_device=lambda: 0, synchronize=lambda *a, **k: None,
        empty_cache=lambda: None, reset_peak_memory_stats=lambda *a: None,
        memory_allocated=lambda *a: 0, max_memory_allocated=lambda *a: 0,
        memory_reserved=lambda *a: 0, max_memory_reserved=lambda *a: 0,
        get_device_name=lambda *a: 'stand-in sm_90 (CPU warm run)',
        get_device_capability=lambda *a: (9, 0), Event=_Event,
        manual_seed=lambda *a: None, manual_seed_all=lambda *a: None)
    saved = {k: getattr(torch.cuda, k) for k in cuda_stubs}
    saved_autocast = (torch.autocast, torch.amp.autocast)
    import convnextv2_fast.impl as impl_mod
    import convnextv2_fast.models  # noqa: F401  (bind resolve_impl first)
    orig_resolve = impl_mod.resolve_impl

    def resolve_impl(impl, device):  # what a CUDA tensor would get
        if getattr(device, 'type', device) == 'cpu':
            device = torch.device('cuda')
        return orig_resolve(impl, device)

    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, '__name__', '').startswith('convnextv2_fast') and \
                getattr(mod, 'resolve_impl', None) is orig_resolve:
            patched.append(mod)
            mod.resolve_impl = resolve_impl
    for k, v in cuda_stubs.items():
        setattr(torch.cuda, k, v)
    torch.autocast = torch.amp.autocast = autocast
    try:
        with CudaToCpu():
            yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)
        torch.autocast, torch.amp.autocast = saved_autocast
        for mod in patched:
            mod.resolve_impl = orig_resolve


# --------------------------------------------------------------------------
# what an area launches
# --------------------------------------------------------------------------
class _TestCapture:
    """pytest plugin: each GPU test body runs inside capture_launches."""

    def __init__(self, capture):
        self.capture = capture
        self.results = {}  # nodeid -> (launches, exception or None)
        self.skipped = []

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self.skipped.append(f'{report.nodeid}: skipped '
                                f'({str(report.longrepr)[-160:]})')

    def pytest_runtest_call(self, item):
        import torch
        body = item.runtest
        err = [None]

        def fn():
            with torch.enable_grad():
                try:
                    body()
                except Exception as exc:  # noqa: BLE001 -- recorded
                    err[0] = exc

        launches = self.capture(fn)
        self.results[item.nodeid] = (launches, err[0])
        item.runtest = lambda: None


def capture_tests(area, capture, log):
    import pytest
    os.environ['CONVNEXTV2_FAST_REQUIRE_EXT'] = '1'  # as on the visit
    plugin = _TestCapture(capture)
    files = [os.path.join(ROOT, f) for f in AREAS[area]['tests']]
    with pretend_cuda():  # setup too: GPU tests skip without "CUDA"
        rc = pytest.main(['-q', '-m', 'gpu', '-p', 'no:cacheprovider',
                          '-o', 'addopts=', '--rootdir', ROOT, *files],
                         plugins=[plugin])
    problems = []
    for nodeid, (launches, exc) in plugin.results.items():
        what = 'ok' if exc is None else f'{type(exc).__name__}'
        log(f'  test {nodeid}: {len(launches)} launches ({what})')
        if exc is not None and not isinstance(exc, AssertionError):
            problems.append(f'{nodeid}: {type(exc).__name__}: {exc}')
    problems += plugin.skipped  # not captured, so not warmed
    if rc not in (0, 5):
        problems.append(f'pytest exit status {rc}')
    return [ln for ls, _ in plugin.results.values() for ln in ls], problems


def _suite_runners(suite):
    """(label, fn) pairs that drive one benchmark suite at full size."""
    import torch
    cuda = torch.device('cuda')
    if suite != 'maskrcnn':
        import importlib
        mod = importlib.import_module(f'benchmarks.bench_{suite}')
        return [(suite, lambda: mod.run_suite(False, cuda, FAST_PROVIDERS))]
    from benchmarks import bench_maskrcnn as bm
    runs = []
    for batch in (2, 4):
        for dtype in ('fp16', 'bf16'):
            def fn(batch=batch, dtype=dtype):
                from mmengine.registry import init_default_scope
                init_default_scope('mmdet')
                from mmdet.registry import MODELS
                cfg = bm.build_cfg('fast', False, batch, dtype, '/unused',
                                   cuda)
                bb = MODELS.build(cfg.model.backbone).to(cuda).train()
                x = torch.randn(batch, 3, 1024, 1024, device=cuda)
                with torch.autocast('cuda', dtype=getattr(
                        torch, bm.DTYPES[dtype])):
                    outs = bb(x)
                sum(o.float().sum() for o in outs).backward()
            runs.append((f'maskrcnn-backbone b{batch} {dtype}', fn))
    return runs


def capture_suites(area, capture, log):
    os.environ.setdefault('BENCH_BUDGET', 'short')
    launches, problems = [], []
    for suite in AREAS[area]['suites']:
        for label, fn in _suite_runners(suite):
            import torch
            err = [None]

            def body(fn=fn):
                with torch.enable_grad():
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 -- recorded
                        err[0] = exc

            got = capture(body)
            log(f'  suite {label}: {len(got)} launches'
                f"{'' if err[0] is None else ' (' + repr(err[0])[:200] + ')'}")
            if err[0] is not None:
                problems.append(f'{label}: {err[0]!r}')
            launches += got
    return launches, problems


def _skip_except_project(sm90):
    """sm90.SkipCompute, except that the project's own custom ops
    (``torch.ops.convnextv2_fast.*``: the fused block's host code, which
    launches the kernels) run their CPU implementation -- under the same
    mode, so the torch ops inside them are still skipped.  SkipCompute
    alone answers them from their fake (shape) implementation, and nothing
    is launched."""
    import torch
    base = sm90._skip_compute_cls()
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    def exact(ts):  # index/mask tensors: the host code branches on them
        return any(isinstance(t, torch.Tensor) and not t.is_floating_point()
                   and not t.is_complex() for t in ts)

    class SkipExceptProject(base):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == 'convnextv2_fast':
                with self:
                    return func.redispatch(cpu, *args, **kwargs)
            if exact(torch.utils._pytree.tree_leaves((args, kwargs))):
                return func(*args, **kwargs)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if exact(torch.utils._pytree.tree_leaves(out)):
                return func(*args, **kwargs)  # e.g. argsort, comparisons
            return out

    return SkipExceptProject


def _base32(hash_hex):
    from triton.runtime.cache import _base32 as b32
    return b32(hash_hex)


def make_capture(cache):
    """capture(fn) -> launches: ``fn`` under pretend_cuda, the stand-in sm_90
    driver (compiling into ``cache``) and SkipExceptProject."""
    os.environ['TRITON_INTERPRET'] = '0'
    sys.path.insert(0, ROOT)
    from benchmarks import sm90
    from convnextv2_fast import autotune
    # impl='auto' times every path of a block shape on its first use
    # (convnextv2_fast.autotune), launching their kernels, on the visit's
    # fresh machine: so here too, tuning on and an empty choice cache of this
    # run's own (the user's is neither read nor written)
    os.environ[autotune.TUNE_ENV] = '1'
    os.environ[autotune.CACHE_DIR_ENV] = tempfile.mkdtemp(
        prefix='warm_triton_choices.')
    autotune.clear_memory_cache()
    skip = _skip_except_project(sm90)
    # the warmer needs the compiles, not sm90's resource analysis
    # (cuobjdump + nvdisasm per launch): a cheap stand-in
    sm90.resources = lambda compiled, args=None: dict(
        regs=32, smem_B=int(compiled.metadata.shared))

    def capture(fn):
        def body():
            with skip():
                fn()
        with pretend_cuda():
            return sm90.capture_launches(body, skip_compute=False,
                                         cache=cache)
    return capture


def capture_area(area, cache, log):
    """Drive the area under the stand-in sm_90 driver with ``cache`` as
    TRITON_CACHE_DIR; return (distinct specialisations, problems)."""
    capture = make_capture(cache)
    t0 = time.perf_counter()
    tl, tp = capture_tests(area, capture, log)
    sl, sp = capture_suites(area, capture, log)
    specs = {}
    for ln in tl + sl:
        key = (ln.kernel, json.dumps(ln.signature, sort_keys=True),
               json.dumps(ln.constexprs, sort_keys=True, default=str),
               ln.num_warps, ln.num_stages)
        # ``key``: the cache folder's name (what the lookup log records)
        specs.setdefault(key, dict(kernel=ln.kernel,
                                   key=_base32(ln.compiled.hash),
                                   compile_s=round(ln.compile_s, 2)))
    log(f'{area}: {len(tl) + len(sl)} launches, {len(specs)} distinct '
        f'specialisations, {time.perf_counter() - t0:.0f} s')
    return list(specs.values()), tp + sp


# --------------------------------------------------------------------------
# the cache folder: prune, relocate, manifest, report
# --------------------------------------------------------------------------
def _groups(cache):
    return sorted(glob.glob(os.path.join(cache, '*', '__grp__*.json')))


def relocate(cache, keep=None, only=None):
    """Point every ``__grp__`` index at the files beside it (Triton stores
    absolute paths); with ``keep``, also delete the files whose suffix is
    not in ``keep``; with ``only`` (cache keys), delete the other entries
    (stale kernels).  Returns the number of groups kept."""
    cache = os.path.abspath(cache)
    n = 0
    for grp in _groups(cache):
        d = os.path.dirname(grp)
        if only is not None and os.path.basename(d) not in only:
            shutil.rmtree(d)
            continue
        with open(grp) as f:
            data = json.load(f)
        kids = {}
        for name in data.get('child_paths', {}):
            p = os.path.join(d, name)
            if keep is not None and not name.endswith(keep):
                if os.path.exists(p):
                    os.remove(p)
                continue
            if os.path.exists(p):
                kids[name] = p
        with open(grp, 'w') as f:
            json.dump(dict(child_paths=kids), f)
        n += 1
    if keep is not None:  # keys without a group (launcher stubs, partials)
        for d in glob.glob(os.path.join(cache, '*')):
            if os.path.isdir(d) and not glob.glob(os.path.join(d, '__grp__*')):
                shutil.rmtree(d)
    return n


def _size_mb(path):
    return sum(os.path.getsize(p) for p in glob.glob(
        os.path.join(path, '**'), recursive=True) if os.path.isfile(p)) / 2**20


def read_lookups(log_path):
    hits, misses = set(), set()
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    (hits if parts[0] == 'hit' else misses).add(
                        (parts[1], parts[2]))
    return hits, misses - hits


def report(cache, log_path, out=None):
    """Hits and misses of a run that used ``cache`` (lookup log written by
    tools/triton_cache_log.py); manifest entries the run never looked up."""
    hits, misses = read_lookups(log_path)
    man_path = os.path.join(cache, 'manifest.json')
    manifest = []
    if os.path.exists(man_path):
        with open(man_path) as f:
            manifest = json.load(f).get('specialisations', [])
    looked = {h for h, _ in hits | misses}
    unused = [m for m in manifest if m['key'] not in looked]
    # torch.compile's (inductor's) kernels are named triton_*; the warmer
    # does not build them (the 'compile' benchmark provider compiles them)
    other = {m for m in misses if m[1].startswith('triton_')}
    misses -= other
    lines = [f'triton cache {cache}: {len(hits)} hits, {len(misses)} misses '
             f'(distinct project-kernel lookups), {len(manifest)} warmed, '
             f'{len(unused)} warmed but not looked up, {len(other)} '
             f'torch.compile kernels compiled on the spot']
    lines += [f'  MISS {k} {key}' for key, k in sorted(misses,
                                                        key=lambda t: t[1])]
    text = '\n'.join(lines) + '\n'
    if out:
        with open(out, 'w') as f:
            f.write(text)
    print(text, end='')
    return len(misses)


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------
def cmd_warm(args):
    import triton
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    logf = open(os.path.join(cache, 'warm.log'), 'a')

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + '\n')
        logf.flush()

    areas = list(AREAS) if args.area == 'all' else [args.area]
    before = {os.path.dirname(g) for g in _groups(cache)}
    t0 = time.perf_counter()
    specs, problems = [], []
    for area in areas:
        s, p = capture_area(area, cache, log)
        specs += s
        problems += p
    n = relocate(cache, keep=KEEP_SUFFIXES, only={s['key'] for s in specs})
    new = {os.path.dirname(g) for g in _groups(cache)} - before
    man = dict(triton=triton.__version__, areas=areas,
               python=sys.version.split()[0],
               specialisations=sorted({json.dumps(s, sort_keys=True)
                                       for s in specs}))
    man['specialisations'] = [json.loads(s) for s in man['specialisations']]
    with open(os.path.join(cache, 'manifest.json'), 'w') as f:
        json.dump(man, f, indent=1)
    log(f'warm {"+".join(areas)}: {len(man["specialisations"])} '
        f'specialisations, {len(new)} compiled now, {n} cache entries, '
        f'{_size_mb(cache):.1f} MiB, {time.perf_counter() - t0:.0f} s '
        f'(triton {triton.__version__})')
    for p in problems:
        log(f'INCOMPLETE CAPTURE: {p}')
    return 1 if problems else 0


def cmd_check(args):
    """Dry-run of the visit's Triton part: drive the area against ``cache``
    with the logging cache manager, then report hits/misses."""
    cache = os.path.abspath(args.cache)
    relocate(cache)
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    os.environ['TRITON_CACHE_MANAGER'] = 'triton_cache_log:LoggingCacheManager'
    lookup = os.path.abspath(args.lookups)
    os.environ['CONVNEXTV2_FAST_CACHE_LOG'] = lookup
    from triton import knobs
    import triton_cache_log
    knobs.cache.manager_class = triton_cache_log.LoggingCacheManager
    specs, problems = capture_area(args.area, cache, print)
    for p in problems:
        print(f'INCOMPLETE CAPTURE: {p}')
    misses = report(cache, lookup, args.out)
    return 1 if (misses or problems) else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    w = sub.add_parser('warm', help='compile the area\'s launches into CACHE')
    w.add_argument('--area', choices=[*AREAS, 'all'], required=True)
    w.add_argument('--cache', required=True)
    c = sub.add_parser('check', help='drive the area against CACHE and '
                       'report hits/misses (the dry-run of the visit)')
    c.add_argument('--area', choices=list(AREAS), required=True)
    c.add_argument('--cache', required=True)
    c.add_argument('--lookups', required=True, help='lookup log to append')
    c.add_argument('--out', default=None, help='report file')
    r = sub.add_parser('relocate', help='point the cache index at CACHE')
    r.add_argument('cache')
    rp = sub.add_parser('report', help='hits/misses from a lookup log')
    rp.add_argument('cache')
    rp.add_argument('lookups')
    rp.add_argument('--out', default=None)
    s = sub.add_parser('show', help='an area\'s tests, suites or budget')
    s.add_argument('--area', choices=list(AREAS), required=True)
    s.add_argument('what', choices=['tests', 'suites', 'budget'])
    args = p.parse_args(argv)
    if args.cmd == 'warm':
        return cmd_warm(args)
    if args.cmd == 'check':
        return cmd_check(args)
    if args.cmd == 'relocate':
        print(f'relocated {relocate(args.cache)} cache entries to '
              f'{os.path.abspath(args.cache)}')
        return 0
    if args.cmd == 'report':
        return 1 if report(args.cache, args.lookups, args.out) else 0
    val = AREAS[args.area][args.what]  # read by tools/gpu_check.sh
    print(' '.join(f'{k}={v}' for k, v in val.items())
          if isinstance(val, dict) else ' '.join(val))
    return 0


if __name__ == '__main__':
    sys.exit(main())
