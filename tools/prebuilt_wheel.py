"""Build the project's wheel once, reuse it everywhere (set-up, packaging test).

A CUDA build of ``csrc/`` for the default architecture list takes many minutes
on a 2-core machine, so ``tools/setup_env.sh`` builds the sdist and the wheel
once (``python -m build --no-isolation``: the wheel is built from the sdist,
i.e. from a clean copy) and

* puts the wheel's compiled extension next to the sources of the editable
  install (``extract``) instead of compiling it a second time, and
* leaves the wheel in ``dist/`` (or ``$CONVNEXTV2_FAST_WHEEL_DIR``), where
  ``tests/test_packaging.py`` installs it into a fresh venv.

A wheel is reused only when it is *current* (:func:`wheel_status`): its build
stamp (``convnextv2_fast/_ext.py``) names this torch, the architecture list a
build here would use now and the digest of today's ``csrc/``, and its Python
files equal the checkout's.

Command line (exit 0 = yes / done, 1 = no)::

    python tools/prebuilt_wheel.py current [--dist DIR]   # a current wheel exists?
    python tools/prebuilt_wheel.py extract [--dist DIR]   # its _C*.so -> convnextv2_fast/
"""
import argparse
import glob
import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile

import cuda_build_env  # tools/ is on sys.path: script dir, or added by setup.py/tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_ENV = 'CONVNEXTV2_FAST_WHEEL_DIR'
EXT_RE = re.compile(r'^convnextv2_fast/_C\.[^/]*\.so$')
CSRC_SUFFIXES = ('.cpp', '.cu', '.h', '.cuh')  # what MANIFEST.in ships of csrc/


def default_dist_dir(root=ROOT):
    return os.environ.get(DIST_ENV) or os.path.join(root, 'dist')


def csrc_digest(root=ROOT):
    """sha256 over the paths and contents of the ``csrc/`` sources (stamped into ``_C``)."""
    h = hashlib.sha256()
    base = os.path.join(root, 'csrc')
    for path in sorted(glob.glob(os.path.join(base, '**', '*'), recursive=True)):
        if os.path.isfile(path) and path.endswith(CSRC_SUFFIXES):
            h.update(os.path.relpath(path, base).replace(os.sep, '/').encode())
            h.update(b'\0')
            with open(path, 'rb') as f:
                h.update(f.read())
            h.update(b'\0')
    return h.hexdigest()


def package_version(root=ROOT):
    scope = {}
    with open(os.path.join(root, 'convnextv2_fast', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def find_wheels(dist_dir, root=ROOT):
    """This version's wheels for this interpreter in ``dist_dir``, newest first."""
    tag = f'cp{sys.version_info[0]}{sys.version_info[1]}'
    pattern = f'convnextv2_fast-{package_version(root)}-{tag}-{tag}-*.whl'
    return sorted(glob.glob(os.path.join(dist_dir, pattern)),
                  key=os.path.getmtime, reverse=True)


def wheel_extension_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if EXT_RE.match(n)]
    return names[0] if names else None


def _read_build_stamp():
    """``convnextv2_fast._ext.read_build_stamp``, loaded from its file alone
    (stdlib only; works before the package or its dependencies are installed)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        '_convnextv2_fast_ext_standalone', os.path.join(ROOT, 'convnextv2_fast', '_ext.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_build_stamp


def wheel_stamp(wheel):
    """The build stamp of the wheel's ``_C`` (read from the file, not imported)."""
    name = wheel_extension_name(wheel)
    if name is None:
        return None
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        return _read_build_stamp()(zf.extract(name, tmp))


def expected_build(root=ROOT, env=None):
    """What a build here (environment ``env``, default ``os.environ``) would
    stamp now: torch, CUDA, the arch list and the csrc digest."""
    import torch
    with_cuda = torch.version.cuda is not None and shutil.which('nvcc') is not None
    archs = (cuda_build_env.resolve_arch_list(torch, os.environ if env is None else env)[0]
             if with_cuda else '')
    return {'torch': torch.__version__, 'torch_cuda': torch.version.cuda,
            'with_cuda': with_cuda, 'cuda_arch_list': archs,
            'csrc_sha256': csrc_digest(root)}


def wheel_status(wheel, root=ROOT, expected=None):
    """(current, why): may ``wheel`` stand for a build of this checkout here?"""
    stamp = wheel_stamp(wheel)
    if not stamp:
        return False, f'{wheel}: no compiled extension or no build stamp'
    expected = expected or expected_build(root)
    for key, want in expected.items():
        if stamp.get(key) != want:
            return False, f'{wheel}: stamp {key}={stamp.get(key)!r}, a build now gives {want!r}'
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith('convnextv2_fast/') and name.endswith('.py'):
                path = os.path.join(root, name)
                if not os.path.isfile(path) or open(path, 'rb').read() != zf.read(name):
                    return False, f'{wheel}: {name} differs from the checkout'
    return True, f'{wheel}: current ({stamp.get("cuda_arch_list") or "C++ only"})'


def current_wheel(dist_dir=None, root=ROOT):
    """(path or None, why) of the newest current wheel in ``dist_dir``."""
    dist_dir = dist_dir or default_dist_dir(root)
    reasons = []
    for wheel in find_wheels(dist_dir, root):
        ok, why = wheel_status(wheel, root)
        if ok:
            return wheel, why
        reasons.append(why)
    return None, '; '.join(reasons) or f'no convnextv2_fast wheel in {dist_dir}'


def extract_extension(wheel, root=ROOT):
    """Copy the wheel's ``_C*.so`` into ``<root>/convnextv2_fast/``; its path."""
    name = wheel_extension_name(wheel)
    if name is None:
        raise SystemExit(f'{wheel} has no compiled extension')
    dest = os.path.join(root, name)
    for old in glob.glob(os.path.join(root, 'convnextv2_fast', '_C.*.so')):
        os.remove(old)
    with zipfile.ZipFile(wheel) as zf, zf.open(name) as src, open(dest, 'wb') as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(dest, 0o755)
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('command', choices=['current', 'extract'])
    parser.add_argument('--dist', default=None,
                        help=f'wheel folder (default ${DIST_ENV} or dist/)')
    args = parser.parse_args(argv)
    wheel, why = current_wheel(args.dist)
    print(f'prebuilt_wheel: {why}')
    if wheel is None:
        return 1
    if args.command == 'extract':
        print(f'prebuilt_wheel: extension -> {extract_extension(wheel)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
