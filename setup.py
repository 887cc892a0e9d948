"""Build ``convnextv2_fast`` and its compiled extension ``convnextv2_fast._C``.

Package metadata (name, version, dependencies, licence, URLs) lives in
``pyproject.toml``; the version itself only in ``convnextv2_fast/version.py``.
This file only describes the extension, built from ``csrc/``:

* C++ sources always; CUDA sources (``*.cu``) when torch has CUDA and ``nvcc``
  is found, or when ``FORCE_CUDA=1``.  ``CONVNEXTV2_FAST_NO_EXT=1`` skips the
  extension (the package then runs its pure-PyTorch paths).  ``MAX_JOBS`` is
  honoured (torch.utils.cpp_extension reads it); ``NVCC_THREADS`` (default 2)
  is nvcc's ``--threads`` (architectures compiled in parallel).
* CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set; else the visible GPUs
  (what torch itself does); else, with no GPU visible (CI runners, container
  build hosts), the default of ``tools/cuda_build_env.default_arch_list``: the
  architectures this torch build ships kernels for from Volta on, plus 8.0,
  8.6, 8.9 and 9.0, kept to what nvcc can compile, PTX for the newest.  The
  choice is printed and stamped into the extension.
* The build stamp (package, torch and CUDA versions, architectures) is compiled
  into ``_C`` (``csrc/bindings.cpp``: attributes ``BUILD_STAMP``,
  ``TORCH_VERSION``, ...); ``convnextv2_fast/_ext.py`` reads it from the shared
  library *before* importing it and refuses a build made for another torch.
* On a machine with nvcc but an incomplete CUDA toolkit (see README, "Building
  without a GPU") ``tools/cuda_build_env.py`` fixes ``CUDA_HOME`` and the CUDA
  math-library include path automatically.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import cuda_build_env  # noqa: E402  (tools/cuda_build_env.py)
import prebuilt_wheel  # noqa: E402  (tools/prebuilt_wheel.py: csrc digest, version)

STAMP_DIR = os.path.join(ROOT, 'build', 'convnextv2_fast_stamp')
STAMP_HEADER = 'convnextv2_fast_build_stamp.h'


def _env_flag(name):
    return os.environ.get(name, '0').lower() in ('1', 'true', 'yes', 'on')


def _log(msg):
    print(f'convnextv2_fast: {msg}', flush=True)


def get_extensions():
    if _env_flag('CONVNEXTV2_FAST_NO_EXT'):
        _log('CONVNEXTV2_FAST_NO_EXT is set: building without the compiled extension')
        return []
    cpp = sorted(glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    cu = sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True))
    if not cpp:
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log('torch not importable at build time; building without the compiled '
             'extension (install torch first, then `pip install --no-build-isolation .`)')
        return []

    with_cuda = bool(cu) and (_env_flag('FORCE_CUDA') or (
        torch.version.cuda is not None and shutil.which('nvcc') is not None))
    define_macros = []
    extra_compile_args = {'cxx': ['-O3', '-std=c++20']}
    include_dirs = [os.path.join(ROOT, 'csrc'), STAMP_DIR]
    sources = list(cpp)
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        include_dirs += cuda_build_env.apply(os.environ)
        cpp_extension.CUDA_HOME = os.environ.get('CUDA_HOME',
                                                 cpp_extension.CUDA_HOME)
        sources += cu
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(('WITH_CUDA', None))
        # --threads: nvcc compiles the per-architecture stages of a .cu in
        # parallel (the .cu is the long pole of the build once there are
        # several archs); NVCC_THREADS overrides, as for flash-attn.
        extra_compile_args['nvcc'] = [
            '-O3', '-std=c++20', '--expt-relaxed-constexpr', '-lineinfo',
            '--threads', os.environ.get('NVCC_THREADS', '2')
        ]
    return [
        ext_cls(
            name='convnextv2_fast._C',
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args)
    ]


def _nvcc_version():
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if 'release' in line:
            return line.split('release')[-1].split(',')[0].strip()
    return None


def _c_string(text):
    """A C string literal for ASCII ``text``."""
    return '"' + text.replace('\\', '\\\\').replace('"', '\\"') + '"'


def write_build_stamp(with_cuda, arch_list):
    """Write the stamp header bindings.cpp compiles in; return the stamp dict."""
    import torch
    stamp = {
        'convnextv2_fast': prebuilt_wheel.package_version(ROOT),
        'torch': torch.__version__,
        'torch_cuda': torch.version.cuda,
        'with_cuda': with_cuda,
        'nvcc': _nvcc_version() if with_cuda else None,
        'cuda_arch_list': arch_list if with_cuda else '',
        'csrc_sha256': prebuilt_wheel.csrc_digest(ROOT),
    }
    text = ''.join([
        '// Generated by setup.py: what convnextv2_fast._C was built against.\n',
        '#pragma once\n',
        f'#define CONVNEXTV2_FAST_STAMP_JSON {_c_string(json.dumps(stamp, sort_keys=True))}\n',
        f'#define CONVNEXTV2_FAST_STAMP_TORCH {_c_string(stamp["torch"])}\n',
        f'#define CONVNEXTV2_FAST_STAMP_CUDA {_c_string(stamp["torch_cuda"] or "")}\n',
        f'#define CONVNEXTV2_FAST_STAMP_ARCHS {_c_string(stamp["cuda_arch_list"])}\n',
    ])
    os.makedirs(STAMP_DIR, exist_ok=True)
    path = os.path.join(STAMP_DIR, STAMP_HEADER)
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the mtime (ninja) when nothing changed
        with open(path, 'w') as f:
            f.write(text)
    return stamp


def get_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    base = BuildExtension.with_options(use_ninja=True)

    class StampedBuildExtension(base):
        """Resolve the CUDA archs, print them, stamp them in, then build."""

        def build_extensions(self):
            with_cuda = any(
                s.endswith('.cu') for e in self.extensions for s in e.sources)
            arch_list = ''
            if with_cuda:
                arch_list, why = cuda_build_env.resolve_arch_list(torch)
                os.environ['TORCH_CUDA_ARCH_LIST'] = arch_list
                _log(f'building C++ + CUDA extension for CUDA archs {arch_list} '
                     f'({why}); MAX_JOBS={os.environ.get("MAX_JOBS", "unset")}')
            else:
                _log('building the C++-only extension (no nvcc or torch without '
                     'CUDA; FORCE_CUDA=1 forces CUDA)')
            stamp = write_build_stamp(with_cuda, arch_list)
            _log(f'build stamp: {json.dumps(stamp, sort_keys=True)}')
            super().build_extensions()

    return {'build_ext': StampedBuildExtension}


ext_modules = get_extensions()

setup(
    packages=find_packages(include=['convnextv2_fast', 'convnextv2_fast.*']),
    ext_modules=ext_modules,
    cmdclass=get_cmdclass() if ext_modules else {},
    zip_safe=False,
)
