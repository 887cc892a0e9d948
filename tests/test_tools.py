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
