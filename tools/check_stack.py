"""Import the whole stack a GPU visit needs and print its versions; exit 1
with the failing import named.

    python tools/check_stack.py [--image-site DIR]

``--image-site DIR``: DIR stands in for the GPU image's site-packages (a CPU
check of the carried wheel set): every module loaded from DIR must belong to a
distribution the image has (``IMAGE``, from the image's package list), so a
wheel missing from the set cannot hide behind a package installed here.
"""
import argparse
import importlib
import importlib.metadata as md
import os
import sys

MODULES = ('torch', 'triton', 'numpy', 'mmengine', 'mmcv', 'mmcv.ops',
           'mmdet', 'mmdet.models', 'mmpretrain', 'mmpretrain.models',
           'pycocotools.coco', 'convnextv2_fast')
# distributions of the GPU image ('cuda', /work/.library/device/KINDS.md)
# that the stack's imports reach; everything else must come as a wheel
IMAGE = {
    'torch', 'torchvision', 'triton', 'numpy', 'scipy', 'matplotlib', 'contourpy', 'cycler',
    'fonttools', 'kiwisolver', 'pyparsing', 'python-dateutil', 'six',
    'pillow', 'packaging', 'pyyaml', 'rich', 'pygments', 'markdown-it-py',
    'mdurl', 'click', 'markdown', 'einops', 'tqdm', 'zipp', 'opencv-python',
    'opencv-python-headless', 'typing-extensions', 'filelock', 'fsspec',
    'jinja2', 'markupsafe', 'networkx', 'sympy', 'mpmath', 'setuptools',
    'tabulate', 'pytz', 'tzdata', 'pandas', 'regex', 'termcolor',
    'cuda-bindings', 'cuda-pathfinder', 'cuda-toolkit', 'pytest', 'pluggy',
    'iniconfig', 'psutil', 'requests', 'urllib3', 'idna', 'certifi',
    'charset-normalizer',
}


def _norm(name):
    return name.lower().replace('_', '-')


def check_image_site(site):
    """Modules loaded from ``site`` that no IMAGE distribution owns (file
    ownership from each distribution's RECORD)."""
    site = os.path.realpath(site) + os.sep
    owner = {}
    for dist in md.distributions(path=[site]):
        for f in dist.files or ():
            owner[os.path.realpath(os.path.join(site, str(f)))] = _norm(
                dist.metadata['Name'])
    bad = set()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, '__file__', None)
        if not f or not os.path.realpath(f).startswith(site):
            continue
        dist = owner.get(os.path.realpath(f), '')
        if dist not in IMAGE and not dist.startswith('nvidia-'):
            bad.add(f'{name.split(".")[0]} ({dist or "no distribution"})')
    return sorted(bad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--image-site', default=None)
    args = p.parse_args(argv)
    for name in MODULES:
        try:
            m = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- name the failing import
            print(f'check_stack: import {name} FAILED: {type(exc).__name__}: '
                  f'{exc}', file=sys.stderr)
            return 1
        if '.' not in name:
            print(f'{name:16s} {getattr(m, "__version__", "?"):24s} '
                  f'{os.path.dirname(m.__file__)}')
    if args.image_site:
        bad = check_image_site(args.image_site)
        if bad:
            print('check_stack: loaded from the stand-in image but not in the '
                  'image (add their wheels to tools/fetch_gpu_wheels.sh): ' +
                  ', '.join(bad), file=sys.stderr)
            return 1
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f'check_stack: OK (cpu {ru.ru_utime + ru.ru_stime:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
