"""Registration of our modules into mmdet's and mmpretrain's ``MODELS``.

Done at ``import convnextv2_fast`` when those packages import; never raises.
The outcome per package is kept in :data:`REGISTRATION` for
``python -m convnextv2_fast.info``.
"""
import importlib
import importlib.util
from typing import Dict

REGISTRATION: Dict[str, str] = {}

_TARGETS = (('mmdet', 'mmdet.registry'), ('mmpretrain', 'mmpretrain.registry'))


def register_modules(modules, packages=None, registry='MODELS') -> Dict[str, str]:
    """Register ``modules`` (classes) into every importable OpenMMLab registry.

    ``packages``: restrict to these of ('mmdet', 'mmpretrain'); default all.
    ``registry``: the registry attribute of ``<package>.registry`` ('MODELS',
    'DATASETS', ...).
    Repeated calls for one package accumulate the registered names.
    """
    for package, registry_module in _TARGETS:
        if packages is not None and package not in packages:
            continue
        if importlib.util.find_spec(package) is None:
            REGISTRATION[package] = 'not installed'
            continue
        try:
            target = getattr(importlib.import_module(registry_module), registry)
            for module in modules:
                target.register_module(module=module, force=True)
        except Exception as exc:  # an installed-but-broken mm* stack
            REGISTRATION[package] = f'not registered: {type(exc).__name__}: {exc}'
        else:
            names = ', '.join(m.__name__ for m in modules)
            previous = REGISTRATION.get(package, '')
            REGISTRATION[package] = (f'{previous}, {names}'
                                     if previous.startswith('registered ') else
                                     f'registered {names}')
    return REGISTRATION
