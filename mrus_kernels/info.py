"""``python -m mrus_kernels.info``: versions, build flags and each backend's status."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _ext
from .backends import BACKENDS, backend_status


def info_lines() -> list[str]:
    lines = [
        f"mrus_kernels {__version__}",
        f"python       {platform.python_version()} ({sys.platform})",
        f"torch        {torch.__version__} (cuda {torch.version.cuda or 'none'}, "
        f"{torch.cuda.device_count()} device(s), {torch.get_num_threads()} CPU threads)",
    ]
    try:
        import triton

        lines.append(f"triton       {triton.__version__}")
    except ImportError:
        lines.append("triton       not installed")
    build = _ext.build_info()
    if build:
        cuda = (
            f"yes (CUDA {build['cuda_version']}, archs {build['cuda_archs']})"
            if build["cuda"] else "no"
        )
        lines += [
            f"_C compiler  {build['compiler']}",
            f"_C OpenMP    {build['openmp']} ({build['openmp_max_threads']} threads max)",
            f"_C CPU SIMD  {build['cpu_simd']}",
            f"_C CUDA      {cuda}",
        ]
    else:
        lines.append(f"_C           missing: {_ext.C_IMPORT_ERROR}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"device {i}     {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
            )
    lines.append("backends:")
    status = backend_status()
    for name in BACKENDS:
        reason = status[name]
        lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return lines


def main() -> None:
    print("\n".join(info_lines()))


if __name__ == "__main__":
    main()
