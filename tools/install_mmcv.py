#!/usr/bin/env python
"""Install mmcv 2.1.0 (with compiled ops) for modern PyTorch.

mmcv 2.1.0 -- the version mmdet 3.3.0 requires -- is published only as a
source distribution, and its build fails with torch >= 2.10: it compiles as
C++17 while the torch headers need C++20, and its setup.py imports
``pkg_resources`` (gone from setuptools >= 81).  This tool:

1. installs mmcv's runtime requirements;
2. if a matching wheel is in a wheel directory (``--wheelhouse`` /
   ``MMCV_WHEELHOUSE``, then the local cache ``~/.cache/convnextv2_fast/wheels``),
   installs it and checks that its compiled ops load with this torch
   (CPU-only wheels at the top level, CUDA wheels in ``gpu/``);
3. otherwise downloads the PyPI sdist, patches the C++ standard to C++20 and
   the ``pkg_resources`` import, builds a wheel with ops (CPU-only by default;
   with CUDA ops when torch has CUDA, a GPU is visible and nvcc is found, or
   with ``--cuda 1``), stores it in the wheel directory (or the cache when that
   is read-only) and installs it.

Building takes ~36 min (CPU ops) to ~76 min (CUDA) on 2 cores.

Usage: python tools/install_mmcv.py [--wheelhouse DIR] [--cuda auto|0|1]
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cuda_build_env  # noqa: E402

RUNTIME_DEPS = ['addict', 'mmengine>=0.10', 'numpy', 'packaging', 'Pillow',
                'pyyaml', 'yapf', 'opencv-python']
DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache',
                             'convnextv2_fast', 'wheels')

SETUP_PATCHES = [
    ('from pkg_resources import DistributionNotFound, get_distribution, '
     'parse_version',
     'from importlib.metadata import PackageNotFoundError as '
     'DistributionNotFound\n'
     'from importlib.metadata import distribution as get_distribution\n'
     'from packaging.version import parse as parse_version'),
    ("'-std=c++17'", "'-std=c++20'"),
    ("'/std:c++17'", "'/std:c++20'"),
]


def log(msg):
    print(f'[install_mmcv] {msg}', flush=True)


def pip(*args):
    cmd = [sys.executable, '-m', 'pip', *args]
    log(' '.join(cmd))
    subprocess.run(cmd, check=True)


def python_tag():
    return f'cp{sys.version_info.major}{sys.version_info.minor}'


def want_cuda(choice):
    if choice in ('0', '1'):
        return choice == '1'
    import torch
    return (torch.version.cuda is not None and torch.cuda.is_available()
            and shutil.which('nvcc') is not None)


def check_installed(version, cuda):
    """True when mmcv==version imports with its compiled ops (and CUDA ops)."""
    code = (
        'import mmcv, sys\n'
        f'assert mmcv.__version__ == {version!r}, mmcv.__version__\n'
        'from mmcv.utils import ext_loader\n'
        "ext_loader.load_ext('_ext', ['nms', 'roi_align_forward'])\n"
        'from mmcv.ops import get_compiling_cuda_version\n'
        'cuda = get_compiling_cuda_version()\n'
        f"sys.exit(0 if (not {cuda} or cuda != 'not available') else 3)\n")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ['(no output)'])[-1]
        log(f'mmcv check failed: {tail}')
    return res.returncode == 0


def candidate_wheels(dirs, version, cuda):
    """Wheels for this Python and machine; CUDA builds (``gpu/``) first when
    CUDA ops are wanted, CPU builds first otherwise."""
    machine = sysconfig.get_platform().split('-')[-1]  # e.g. x86_64
    pattern = f'mmcv-{version}-{python_tag()}-{python_tag()}-*{machine}.whl'
    order = ['gpu', ''] if cuda else ['', 'gpu']
    found = [whl for d in dirs for sub in order
             for whl in sorted(glob.glob(os.path.join(d, sub, pattern)))]
    return list(dict.fromkeys(found))


def download_sdist(version, work):
    """Download and unpack the mmcv sdist into ``work``; return its folder."""
    pip('download', '--no-deps', '--no-binary', ':all:', '--no-build-isolation',
        f'mmcv=={version}', '-d', work)
    sdist = os.path.join(work, f'mmcv-{version}.tar.gz')
    with tarfile.open(sdist) as tar:
        tar.extractall(work)
    return os.path.join(work, f'mmcv-{version}')


def patch_setup(src):
    """Apply SETUP_PATCHES to ``src/setup.py``; raise if a target is missing."""
    setup_py = os.path.join(src, 'setup.py')
    text = open(setup_py).read()
    for old, new in SETUP_PATCHES:
        if old not in text:
            raise RuntimeError(f'mmcv setup.py patch target not found: {old!r}')
        text = text.replace(old, new)
    with open(setup_py, 'w') as f:
        f.write(text)
    log('patched setup.py: C++20, no pkg_resources')


def build_wheel(version, cuda, out_dir, jobs):
    work = tempfile.mkdtemp(prefix='mmcv-build-')
    src = download_sdist(version, work)
    patch_setup(src)
    env = dict(os.environ, MMCV_WITH_OPS='1', MAX_JOBS=str(jobs))
    if cuda:
        env['FORCE_CUDA'] = '1'
        includes = cuda_build_env.apply(env)
        env['CPATH'] = os.pathsep.join(
            includes + [p for p in [env.get('CPATH')] if p])
    else:
        env['FORCE_CUDA'] = '0'
        env['CUDA_VISIBLE_DEVICES'] = ''  # mmcv enables CUDA if a GPU shows
    build_dir = os.path.join(work, 'dist')
    cmd = [sys.executable, '-m', 'pip', 'wheel', '--no-deps',
           '--no-build-isolation', '-w', build_dir, src]
    log(f"building mmcv {version} ({'CUDA' if cuda else 'CPU'} ops, "
        f'MAX_JOBS={jobs}): {" ".join(cmd)}')
    subprocess.run(cmd, check=True, env=env)
    built = glob.glob(os.path.join(build_dir, f'mmcv-{version}-*.whl'))[0]
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, os.path.basename(built))
    shutil.copy2(built, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def writable(d):
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--wheelhouse', default=os.environ.get(
        'MMCV_WHEELHOUSE'), help='wheel directory (env MMCV_WHEELHOUSE)')
    parser.add_argument('--cuda', choices=['auto', '0', '1'],
                        default=os.environ.get('MMCV_CUDA', 'auto'))
    parser.add_argument('--version', default='2.1.0')
    parser.add_argument('--jobs', type=int,
                        default=int(os.environ.get('MAX_JOBS',
                                                   os.cpu_count() or 1)))
    parser.add_argument('--no-build', action='store_true',
                        help='fail instead of building from source')
    args = parser.parse_args(argv)
    if args.wheelhouse and not os.path.isdir(args.wheelhouse):
        parser.error(f'--wheelhouse {args.wheelhouse!r} is not a directory')

    cuda = want_cuda(args.cuda)
    log(f"python {python_tag()}, want {'CUDA' if cuda else 'CPU'} ops")
    pip('install', '-q', *RUNTIME_DEPS)
    if check_installed(args.version, cuda):
        log(f'mmcv {args.version} already installed with working ops')
        return 0
    dirs = [d for d in (args.wheelhouse, DEFAULT_CACHE) if d]
    for whl in candidate_wheels(dirs, args.version, cuda):
        log(f'trying wheel {whl}')
        pip('install', '-q', '--no-deps', '--force-reinstall', whl)
        if check_installed(args.version, cuda):
            log(f'installed {whl}')
            return 0
    if args.no_build:
        log('no working wheel found and --no-build given')
        return 1
    store = args.wheelhouse if args.wheelhouse and writable(
        args.wheelhouse) else DEFAULT_CACHE
    out_dir = os.path.join(store, 'gpu') if cuda else store
    whl = build_wheel(args.version, cuda, out_dir, args.jobs)
    pip('install', '-q', '--no-deps', '--force-reinstall', whl)
    if not check_installed(args.version, cuda):
        log('built wheel installed but its ops do not load')
        return 1
    log(f'built, cached at {whl}, installed')
    return 0


if __name__ == '__main__':
    sys.exit(main())
