"""Build/install ``convnextv2_fast``.

The compiled extension ``convnextv2_fast._C`` is built from ``csrc/``:
C++ sources always, CUDA sources (``*.cu``) when torch has CUDA and ``nvcc`` is
found, or when ``FORCE_CUDA=1``.  ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are
honoured (torch.utils.cpp_extension reads them).  ``CONVNEXTV2_FAST_NO_EXT=1``
skips the extension (the package then runs its pure-PyTorch paths).

On a machine with nvcc but an incomplete CUDA toolkit (see README, "Building
without a GPU") two fixes are applied automatically: ``CUDA_HOME`` is taken
from nvcc's own ``TOP=`` report, and the CUDA math-library headers shipped in
torch's ``nvidia/cu13/include`` pip package are added to the include path.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import cuda_build_env  # noqa: E402  (tools/cuda_build_env.py)


def _env_flag(name):
    return os.environ.get(name, '0').lower() in ('1', 'true', 'yes', 'on')


def get_extensions():
    if _env_flag('CONVNEXTV2_FAST_NO_EXT'):
        return []
    cpp = sorted(glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    cu = sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True))
    if not cpp:
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print('convnextv2_fast: torch not importable at build time; '
              'building without the compiled extension')
        return []

    with_cuda = _env_flag('FORCE_CUDA') or (
        torch.version.cuda is not None and shutil.which('nvcc') is not None)
    define_macros = []
    extra_compile_args = {'cxx': ['-O3', '-std=c++20']}
    include_dirs = [os.path.join(ROOT, 'csrc')]
    sources = list(cpp)
    ext_cls = cpp_extension.CppExtension
    if with_cuda and cu:
        include_dirs += cuda_build_env.apply(os.environ)
        cpp_extension.CUDA_HOME = os.environ.get('CUDA_HOME',
                                                 cpp_extension.CUDA_HOME)
        sources += cu
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(('WITH_CUDA', None))
        extra_compile_args['nvcc'] = [
            '-O3', '-std=c++20', '--expt-relaxed-constexpr', '-lineinfo'
        ]
    return [
        ext_cls(
            name='convnextv2_fast._C',
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args)
    ]


def get_cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {'build_ext': BuildExtension.with_options(use_ninja=True)}


ext_modules = get_extensions()

setup(
    name='convnextv2_fast',
    version='0.1.0',
    description='ConvNeXt V2 for mmdet/mmpretrain with fused Triton kernels '
    'and sparse FCMAE pretraining',
    long_description=open(os.path.join(ROOT, 'README.md')).read()
    if os.path.exists(os.path.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['convnextv2_fast', 'convnextv2_fast.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.1', 'mmengine>=0.10', 'numpy'],
    extras_require={
        # mmcv 2.1.0 must be built for modern torch: tools/install_mmcv.sh
        'mmdet': ['mmcv==2.1.0', 'mmdet==3.3.0', 'mmpretrain==1.2.0',
                  'pycocotools'],
        'test': ['pytest', 'pytest-benchmark', 'hypothesis'],
        'bench': ['matplotlib', 'tqdm', 'rich'],
    },
    ext_modules=ext_modules,
    cmdclass=get_cmdclass() if ext_modules else {},
    zip_safe=False,
)
