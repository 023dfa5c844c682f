"""``python -m mrus_kernels.quickbench``: a short benchmark of ``warp`` on this machine.

Times every backend usable here against the plain-PyTorch baselines (the VoxelMorph-style
grid_sample transformer and the gather-based reference) at 1×1×64×64×64 float32, forward
and forward+backward, checks each result against the reference, and prints a table. The
full suite with GPU sizes is ``pytest benchmarks``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from . import reference
from .backends import available_backends, call_reason
from .warp import warp


def _smooth_ddf(shape: tuple[int, ...], amplitude: float, device: torch.device) -> torch.Tensor:
    coarse = torch.randn(shape[0], len(shape) - 2, *[max(2, n // 8) for n in shape[2:]])
    mode = "trilinear" if len(shape) == 5 else "bilinear"
    ddf = torch.nn.functional.interpolate(coarse, size=shape[2:], mode=mode, align_corners=True)
    return (amplitude * ddf / ddf.abs().amax()).to(device)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def run(size: int = 64, repeats: int = 7, device: str = "cpu") -> list[tuple[str, float, float]]:
    dev = torch.device(device)
    torch.manual_seed(0)
    image = torch.randn(1, 1, size, size, size, device=dev)
    ddf = _smooth_ddf((1, 3, size, size, size), 4.0, dev)
    expected = reference.warp(image, ddf)
    rows: list[tuple[str, Callable]] = [
        ("grid_sample (VoxelMorph-style)", reference.warp_grid_sample)
    ]
    if size <= 64:
        rows.append(("reference (gather)", reference.warp))
    for name in available_backends():
        if name != "torch" and call_reason(name, dev, torch.float32) is None:
            rows.append((f"mrus {name}", lambda i, d, _n=name: warp(i, d, backend=_n)))
    table = []
    for label, fn in rows:
        out = fn(image, ddf)
        err = (out - expected).abs().max().item()
        if not err <= 1e-4:
            raise AssertionError(f"{label}: max error {err:.3g} against the reference")
        img, d = image.clone().requires_grad_(), ddf.clone().requires_grad_()

        def step(
            fn: Callable = fn, img: torch.Tensor = img, d: torch.Tensor = d
        ) -> None:
            fn(img, d).square().mean().backward()

        fwd = _median_ms(lambda fn=fn: fn(image, ddf), repeats, dev)
        table.append((label, fwd, _median_ms(step, repeats, dev)))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cube edge in voxels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    table = run(args.size, args.repeats, args.device)
    base = table[0][2]
    print(f"warp 1x1x{args.size}x{args.size}x{args.size} float32 on {args.device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'':32} {'forward ms':>11} {'fwd+bwd ms':>11} {'fwd+bwd speed-up':>17}")
    for label, fwd, fb in table:
        print(f"{label:32} {fwd:11.2f} {fb:11.2f} {base / fb:16.2f}x")


if __name__ == "__main__":
    main()
