"""A Triton cache manager that logs every kernel lookup as a hit or a miss.

    TRITON_CACHE_MANAGER=triton_cache_log:LoggingCacheManager   (tools/ on PYTHONPATH)
    CONVNEXTV2_FAST_CACHE_LOG=/path/to/lookups.log

Triton's compile() asks the cache manager of a specialisation's key for the
group of ``<kernel>.json`` once per process; a group holding that metadata
file is a hit (the cubin is loaded), anything else a miss (Triton compiles).
One line per lookup, ``hit|miss <key> <kernel>``, appended (safe across
pytest-xdist workers: one short write per line).
"""
import os

from triton.runtime.cache import FileCacheManager

LOG_ENV = 'CONVNEXTV2_FAST_CACHE_LOG'


class LoggingCacheManager(FileCacheManager):

    def get_group(self, filename):
        group = super().get_group(filename)
        log = os.environ.get(LOG_ENV)
        if log and filename.endswith('.json') and \
                not filename.startswith('__grp__'):
            hit = bool(group) and filename in group
            line = f"{'hit' if hit else 'miss'} {self.key} {filename[:-5]}\n"
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return group
