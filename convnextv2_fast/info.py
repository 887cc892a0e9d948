"""``python -m convnextv2_fast.info``: versions, GPU, extension and impl choice."""
import importlib
import platform


def _version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # not installed, or broken (e.g. mmcv vs torch)
        return f'not importable ({type(exc).__name__}: {exc})'.splitlines()[0]
    return getattr(module, '__version__', 'unknown version')


def collect() -> dict:
    """Everything the report prints, as a dict (used by tests and benchmarks)."""
    import torch

    import convnextv2_fast
    from convnextv2_fast import _ext, autotune, impl

    info = {
        'python': platform.python_version(),
        'convnextv2_fast': convnextv2_fast.__version__,
        'torch': torch.__version__,
        'torch CUDA build': str(torch.version.cuda),
    }
    for name in ('triton', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain'):
        info[name] = _version(name)
    if torch.cuda.is_available():
        info['GPU'] = ', '.join(
            torch.cuda.get_device_name(i)
            for i in range(torch.cuda.device_count()))
    else:
        info['GPU'] = 'none (torch.cuda.is_available() is False)'
    loaded, why = _ext.extension_status()
    info['compiled extension'] = why
    if _ext.build_stamp() is not None or _ext._STATE['path']:
        info['compiled extension build'] = _ext.describe_build(_ext.build_stamp())
    ok, why = impl.fused_status()
    info['fused Triton ops'] = why
    info["impl='auto' picks"] = impl.auto_choice_description()
    info["impl='auto' tuning"] = autotune.describe()
    info['TRITON_INTERPRET'] = '1' if impl.is_interpreter() else '0'
    for package, state in sorted(convnextv2_fast.REGISTRATION.items()):
        info[f'{package} registry'] = state
    return info


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f'{key:<{width}} : {value}')


if __name__ == '__main__':
    main()
