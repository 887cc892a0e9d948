"""tools/install_mmcv.py: wheel selection, argument errors, the sdist patch."""
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import install_mmcv  # noqa: E402


def test_candidate_wheel_order(tmp_path):
    tag = install_mmcv.python_tag()
    machine = install_mmcv.sysconfig.get_platform().split('-')[-1]
    (tmp_path / 'gpu').mkdir()
    cpu = tmp_path / f'mmcv-2.1.0-{tag}-{tag}-linux_{machine}.whl'
    gpu = tmp_path / 'gpu' / cpu.name
    other_py = tmp_path / f'mmcv-2.1.0-cp27-cp27-linux_{machine}.whl'
    for f in (cpu, gpu, other_py):
        f.write_bytes(b'')
    assert install_mmcv.candidate_wheels([str(tmp_path)], '2.1.0',
                                         cuda=False) == [str(cpu), str(gpu)]
    assert install_mmcv.candidate_wheels([str(tmp_path)], '2.1.0',
                                         cuda=True) == [str(gpu), str(cpu)]
    assert install_mmcv.candidate_wheels([str(tmp_path)], '2.0.0',
                                         cuda=False) == []


def test_missing_wheelhouse_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'install_mmcv.py'),
         '--wheelhouse', str(tmp_path / 'nope'), '--no-build'],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert 'is not a directory' in res.stderr


def test_patch_applies_to_real_sdist():
    """The C++20 / pkg_resources patch targets exist in the PyPI sdist."""
    with tempfile.TemporaryDirectory() as work:
        try:
            src = install_mmcv.download_sdist('2.1.0', work)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f'PyPI unreachable, cannot fetch the mmcv sdist: {exc}')
        install_mmcv.patch_setup(src)
        text = open(os.path.join(src, 'setup.py')).read()
        assert 'pkg_resources' not in text
        assert "'-std=c++17'" not in text and "'-std=c++20'" in text
        compile(text, 'setup.py', 'exec')  # still valid Python


# --------------------------------------------------------------------------
# tools/fetch_gpu_wheels.sh: the carried wheel set is complete
# --------------------------------------------------------------------------
def _wheelhouse():
    for d in (os.environ.get('MMCV_WHEELHOUSE'),
              os.path.join(ROOT, '..', 'shared', 'wheels')):
        if d and os.path.isdir(d):
            return d
    out = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--path-format=absolute',
                          '--git-common-dir'], capture_output=True, text=True)
    d = os.path.join(os.path.dirname(out.stdout.strip()), '..', 'shared',
                     'wheels')
    return d if out.returncode == 0 and os.path.isdir(d) else None


@pytest.mark.slow
def test_wheel_set_installs_with_no_deps_and_imports(tmp_path):
    """The set for THIS Python (the GPU gets the cp312 one from the same
    list), installed with --no-index --no-deps into a fresh venv whose only
    other packages are the stand-in image (this environment's site-packages,
    restricted to the image's distributions by tools/check_stack.py), imports
    mmengine, mmcv.ops, mmdet, mmpretrain and convnextv2_fast.

    Wheels are downloaded from PyPI once into CONVNEXTV2_FAST_WHEEL_CACHE
    (default ~/.cache/convnextv2_fast/wheels-cpXY), outside the repository;
    CI has PyPI access.  The mmcv wheel comes from the wheelhouse
    (MMCV_WHEELHOUSE or ../shared/wheels)."""
    import sysconfig
    house = _wheelhouse()
    if house is None:
        pytest.skip('no mmcv wheelhouse (MMCV_WHEELHOUSE or ../shared/wheels)')
    ver = f'{sys.version_info.major}.{sys.version_info.minor}'
    cache = os.environ.get('CONVNEXTV2_FAST_WHEEL_CACHE', os.path.expanduser(
        f'~/.cache/convnextv2_fast/wheels-cp{ver.replace(".", "")}'))
    env = dict(os.environ, MMCV_WHEELHOUSE=house)
    res = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'fetch_gpu_wheels.sh'),
                          '--python-version', ver, '--mmcv', 'any', cache],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                   check=True, timeout=120)
    site = venv / 'lib' / f'python{ver}' / 'site-packages'
    wheels = sorted(os.path.join(cache, f) for f in os.listdir(cache)
                    if f.endswith('.whl'))
    res = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',
                          '--no-index', '--no-deps', '--no-compile',
                          '--target', str(site)] + wheels,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    image = sysconfig.get_paths()['purelib']  # stand-in for the image
    (site / '_image.pth').write_text(image + '\n')
    res = subprocess.run([str(venv / 'bin' / 'python'), '-W', 'ignore',
                          os.path.join(ROOT, 'tools', 'check_stack.py'),
                          '--image-site', image],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'check_stack: OK' in res.stdout
    assert str(site) in res.stdout  # mmengine & co. came from the set
