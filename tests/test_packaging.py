"""Packaging: the default CUDA arch list, the build stamp and the torch-mismatch
refusal, the sdist's contents, and the wheel in a fresh venv.

The wheel test needs a wheel built here with ``TORCH_CUDA_ARCH_LIST`` unset
(nvcc present, no GPU: the case where torch's own helper raises IndexError).
Building one takes many minutes on 2 cores, so the wheel that
``tools/setup_env.sh`` built (``python -m build``: sdist, then the wheel from
the sdist, i.e. from a clean copy; left in ``dist/`` or
``$CONVNEXTV2_FAST_WHEEL_DIR``) is reused when it is current for this checkout
(``tools/prebuilt_wheel.py``: same torch, default arch list, ``csrc/`` digest
and Python files); otherwise the test builds one from a clean copy of the
checkout's files (``git ls-files``), with ``TORCH_CUDA_ARCH_LIST`` unset.

The fresh venv reuses the installed torch instead of installing it again
(minutes, gigabytes): it is created with ``--without-pip`` and a ``.pth`` file
naming the site-packages folder that holds torch/numpy/mmengine; the outer pip
installs the wheel into it (``pip --python``).  A ``.pth`` entry is a plain
path, so the project's own editable install there stays invisible, and the
probe checks that ``convnextv2_fast`` is imported from the venv.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import cuda_build_env  # noqa: E402
import prebuilt_wheel  # noqa: E402

from convnextv2_fast import _ext  # noqa: E402

VERSION = prebuilt_wheel.package_version()
TORCH_STAMP = f'"torch": "{torch.__version__}"'.encode()
FAKE_TORCH = ('0.0.0+' + 'x' * 64)[:len(torch.__version__)]  # same length: patch in place


# -- default arch list (no build) ---------------------------------------------------
TORCH_2_14_CU130 = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']
NVCC_13 = ['7.5', '8.0', '8.6', '8.7', '8.8', '8.9', '9.0', '10.0', '11.0', '10.3',
           '12.0', '12.1']


def test_default_arch_list_covers_torch_build_and_required_archs():
    archs = cuda_build_env.default_arch_list(TORCH_2_14_CU130, NVCC_13)
    assert archs == '7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'
    # older torch / older nvcc: pre-Volta dropped, only compilable archs kept
    assert cuda_build_env.default_arch_list(
        ['sm_50', 'sm_60', 'sm_70', 'sm_80', 'sm_90a'], ['7.0', '8.0', '8.6', '8.9', '9.0']
    ) == '7.0;8.0;8.6;8.9;9.0+PTX'
    assert cuda_build_env.default_arch_list([], None) == '8.0;8.6;8.9;9.0+PTX'
    with pytest.raises(RuntimeError, match='TORCH_CUDA_ARCH_LIST'):
        cuda_build_env.default_arch_list(['sm_80'], ['5.0'])


def test_resolve_arch_list_sources(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    archs, why = cuda_build_env.resolve_arch_list(torch, {'TORCH_CUDA_ARCH_LIST': '8.0 9.0+PTX'})
    assert (archs, why) == ('8.0;9.0+PTX', 'TORCH_CUDA_ARCH_LIST')
    archs, why = cuda_build_env.resolve_arch_list(torch, {})
    assert why.startswith('default') and archs.endswith('+PTX')
    for required in cuda_build_env.REQUIRED_ARCHS:
        assert required in archs.split(';') or f'{required}+PTX' in archs.split(';')
    # GPUs visible: what torch does (capabilities clamped to torch's newest)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i: [(9, 0), (8, 6)][i])
    assert cuda_build_env.resolve_arch_list(torch, {})[0] == '8.6;9.0+PTX'
    assert cuda_build_env.visible_gpu_arch_list([(13, 0)], TORCH_2_14_CU130) == '12.0+PTX'


# -- build stamp: reading without importing, mismatch decision ---------------------
def test_read_build_stamp_from_bytes(tmp_path):
    stamp = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda}
    blob = (b'\x7fELF junk CONVNEXTV2_FAST_BUILD_STAMP=not json\0 more '
            + b'CONVNEXTV2_FAST_BUILD_STAMP=' + json.dumps(stamp).encode() + b'\0tail')
    (tmp_path / 'a.so').write_bytes(blob)
    assert _ext.read_build_stamp(str(tmp_path / 'a.so')) == stamp
    (tmp_path / 'b.so').write_bytes(b'\x7fELF no stamp here')
    assert _ext.read_build_stamp(str(tmp_path / 'b.so')) is None


def test_stamp_mismatch_decision():
    same = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda}
    assert _ext.stamp_mismatch(same) is None
    assert _ext.stamp_mismatch(None) is None  # unknown provenance: loaded, reported
    msg = _ext.stamp_mismatch(dict(same, torch='2.0.0+cu118'))
    assert 'built for torch 2.0.0+cu118' in msg and torch.__version__ in msg
    assert '--no-build-isolation' in msg
    assert _ext.stamp_mismatch(dict(same, torch_cuda='11.8')) is not None


# -- sdist ----------------------------------------------------------------------------
def _tracked_files():
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                          '--exclude-standard'], cwd=ROOT, capture_output=True,
                         check=True)
    return [f for f in out.stdout.decode().split('\0')
            if f and os.path.isfile(os.path.join(ROOT, f))]


def _clean_copy(dest):
    """The checkout's own files (tracked or not ignored): no build outputs."""
    for rel in _tracked_files():
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return dest


def _clean_env():
    env = dict(os.environ, MAX_JOBS=os.environ.get('MAX_JOBS', '2'))
    for key in ('TORCH_CUDA_ARCH_LIST', 'PYTHONPATH', 'CONVNEXTV2_FAST_NO_EXT',
                'CONVNEXTV2_FAST_REQUIRE_EXT', 'FORCE_CUDA'):
        env.pop(key, None)
    return env


def test_sdist_carries_what_a_build_needs(tmp_path):
    src = _clean_copy(str(tmp_path / 'src'))
    env = dict(_clean_env(), CONVNEXTV2_FAST_NO_EXT='1')  # no torch work for an sdist
    res = subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path)],
                         cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sdist, = glob.glob(str(tmp_path / f'convnextv2_fast-{VERSION}.tar.gz'))
    with tarfile.open(sdist) as tf:
        names = {n.split('/', 1)[1] for n in tf.getnames() if '/' in n}
    needed = {f for f in _tracked_files()
              if f.startswith(('csrc/', 'configs/', 'convnextv2_fast/'))
              and f.endswith(('.cpp', '.cu', '.h', '.cuh', '.py'))}
    needed |= {'setup.py', 'pyproject.toml', 'README.md', 'LICENSE', 'MANIFEST.in',
               'tools/cuda_build_env.py', 'tools/prebuilt_wheel.py'}
    assert not needed - names, f'missing from the sdist: {sorted(needed - names)}'
    assert not [n for n in names if n.endswith('.so')]


# -- the wheel in a fresh venv --------------------------------------------------------
@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel of this checkout built here with TORCH_CUDA_ARCH_LIST unset."""
    env = _clean_env()
    expected = prebuilt_wheel.expected_build(env=env)
    for dist in dict.fromkeys([prebuilt_wheel.default_dist_dir(), os.path.join(ROOT, 'dist')]):
        for path in prebuilt_wheel.find_wheels(dist):
            ok, why = prebuilt_wheel.wheel_status(path, expected=expected)
            print(f'prebuilt wheel: {why}')
            if ok:
                return path
    work = tmp_path_factory.mktemp('wheel')
    src = _clean_copy(str(work / 'src'))
    print(f'building a wheel from a clean copy ({src}), TORCH_CUDA_ARCH_LIST unset')
    res = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-build-isolation',
                          '--no-deps', '-v', '-w', str(work), src], env=env,
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    path, = prebuilt_wheel.find_wheels(str(work))
    ok, why = prebuilt_wheel.wheel_status(path, expected=expected)
    assert ok, why
    return path


@pytest.fixture(scope='module')
def venv(wheel, tmp_path_factory):
    """A fresh venv that sees the installed torch (.pth) and has the wheel."""
    path = tmp_path_factory.mktemp('venv') / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True,
                   timeout=300)
    py = str(path / 'bin' / 'python')
    site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    import mmengine
    import numpy
    deps = {os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, numpy, mmengine)}
    with open(os.path.join(site, '_reuse_installed_torch.pth'), 'w') as f:
        f.write('\n'.join(sorted(deps)) + '\n')
    res = subprocess.run([sys.executable, '-m', 'pip', '--python', py, 'install', '-q',
                          '--no-deps', '--no-index', wheel], capture_output=True, text=True,
                         timeout=600, env=_clean_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return str(path), site


PROBE = r'''
import importlib.metadata, json, sys, warnings
import torch
import convnextv2_fast
from convnextv2_fast import _ext
from convnextv2_fast.sparse import (layout_from_visibility, sparse_dwconv7x7,
                                    sparse_dwconv7x7_dense_masked_ref)
g = torch.Generator().manual_seed(0)
layout = layout_from_visibility(torch.rand(2, 9, 11, generator=g) < 0.5)
f = torch.randn(layout.num_rows, 5, generator=g)
w, b = torch.randn(5, 1, 7, 7, generator=g) * 0.2, torch.randn(5, generator=g)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = sparse_dwconv7x7(f, w, b, layout)  # impl='auto': compiled op if loaded
    out2 = sparse_dwconv7x7(f, w, b, layout)
ref = sparse_dwconv7x7_dense_masked_ref(f, w, b, layout)
loaded, status = _ext.extension_status()
res = dict(file=convnextv2_fast.__file__, version=convnextv2_fast.__version__,
           dist_version=importlib.metadata.version('convnextv2_fast'), loaded=loaded,
           status=status, stamp=_ext.build_stamp(),
           imported_C='convnextv2_fast._C' in sys.modules,
           err=(out - ref).abs().max().item(), err2=(out2 - ref).abs().max().item(),
           warnings=[str(x.message) for x in caught if 'convnextv2_fast' in str(x.message)])
if loaded:
    import convnextv2_fast._C as C
    res['C'] = dict(file=C.__file__, TORCH_VERSION=C.TORCH_VERSION, CUDA_VERSION=C.CUDA_VERSION,
                    CUDA_ARCH_LIST=C.CUDA_ARCH_LIST, WITH_CUDA=C.WITH_CUDA,
                    BUILD_STAMP=json.loads(C.BUILD_STAMP))
    ext = sparse_dwconv7x7(f, w, b, layout, impl='ext')
    res['err_ext'] = (ext - ref).abs().max().item()
print('PROBE' + json.dumps(res))
'''


def _probe(py, cwd, env):
    res = subprocess.run([py, '-c', PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    line, = [x for x in res.stdout.splitlines() if x.startswith('PROBE')]
    info = subprocess.run([py, '-m', 'convnextv2_fast.info'], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert info.returncode == 0, info.stdout + info.stderr
    return json.loads(line[len('PROBE'):]), info.stdout


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta_name, = [n for n in zf.namelist() if n.endswith('.dist-info/METADATA')]
        meta = zf.read(meta_name).decode()
        names = zf.namelist()
    assert f'Version: {VERSION}\n' in meta
    assert 'Requires-Python: >=3.9' in meta
    assert 'License-Expression: Apache-2.0' in meta and 'License-File: LICENSE' in meta
    assert 'Project-URL: ' in meta and 'Classifier: ' in meta
    assert 'Requires-Dist: torch>=2.1' in meta
    assert prebuilt_wheel.wheel_extension_name(wheel) in names


def test_wheel_installs_and_loads_in_fresh_venv(venv, tmp_path):
    path, site = venv
    probe, info = _probe(os.path.join(path, 'bin', 'python'), str(tmp_path), _clean_env())
    print(info)
    assert probe['file'].startswith(site), probe['file']
    assert probe['version'] == probe['dist_version'] == VERSION
    assert probe['loaded'], probe['status']
    assert probe['C']['file'].startswith(site)
    stamp = probe['C']['BUILD_STAMP']
    assert stamp == probe['stamp']  # file read before import == module attribute
    assert probe['C']['TORCH_VERSION'] == stamp['torch'] == torch.__version__
    assert probe['C']['CUDA_VERSION'] == (torch.version.cuda or '')
    expected = prebuilt_wheel.expected_build(env=_clean_env())
    assert probe['C']['CUDA_ARCH_LIST'] == stamp['cuda_arch_list'] == expected['cuda_arch_list']
    assert probe['C']['WITH_CUDA'] == expected['with_cuda']
    assert probe['err'] < 1e-5 and probe['err_ext'] < 1e-5 and not probe['warnings']
    assert 'compiled extension       : loaded from ' + site in info
    build_line, = [x for x in info.splitlines() if x.startswith('compiled extension build')]
    assert f'torch {torch.__version__}' in build_line
    if expected['with_cuda']:
        assert f'CUDA archs {expected["cuda_arch_list"]}' in build_line
        print(f'wheel built for CUDA archs {expected["cuda_arch_list"]}')


def test_extension_for_another_torch_is_refused(venv, tmp_path):
    """The wheel's package with its _C stamped for another torch: never imported,
    the mismatch and the fix are reported, the reference paths run."""
    path, site = venv
    pkg = shutil.copytree(os.path.join(site, 'convnextv2_fast'),
                          str(tmp_path / 'mismatch' / 'convnextv2_fast'))
    so, = glob.glob(os.path.join(pkg, '_C.*.so'))
    blob = open(so, 'rb').read()
    assert TORCH_STAMP in blob
    fake = f'"torch": "{FAKE_TORCH}"'.encode()
    with open(so, 'wb') as f:
        f.write(blob.replace(TORCH_STAMP, fake))
    env = dict(_clean_env(), PYTHONPATH=str(tmp_path / 'mismatch'))
    probe, info = _probe(os.path.join(path, 'bin', 'python'), str(tmp_path), env)
    print(info)
    assert probe['file'].startswith(str(tmp_path / 'mismatch'))
    assert probe['stamp']['torch'] == FAKE_TORCH
    assert not probe['loaded'] and not probe['imported_C']
    for text in (probe['status'], info):
        assert f'built for torch {FAKE_TORCH}' in text and torch.__version__ in text
        assert 'pip install --no-build-isolation' in text
    assert len(probe['warnings']) == 1, probe['warnings']  # one-time warning
    assert f'built for torch {FAKE_TORCH}' in probe['warnings'][0]
    assert probe['err'] < 1e-5 and probe['err2'] < 1e-5  # pure-PyTorch path, right answer
    # the same package with the real stamp loads: the refusal came from the stamp alone
    with open(so, 'wb') as f:
        f.write(blob)
    probe, _ = _probe(os.path.join(path, 'bin', 'python'), str(tmp_path), env)
    assert probe['loaded'] and probe['imported_C'], probe['status']
