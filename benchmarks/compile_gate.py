"""Compile gate: every GPU kernel compiled for sm_80 and sm_90 on a machine without a GPU.

Two halves, both read registers, spills and shared memory per kernel and fail on any spill
or on shared memory above the architecture's per-block limit:

- **Triton.** The kernel variants are not listed by hand: a process with
  ``TRITON_INTERPRET=1`` drives every public operator with ``backend="triton"`` on tiny CPU
  tensors (forward and backward with each input requiring grad alone and all together,
  float32 / float16 / bfloat16, 2D and 3D, every mode, padding, mask and deterministic
  setting, MI bin counts up to ``mi.TRITON_MAX_BINS``, and once more with
  ``_common.IDX64_THRESHOLD`` lowered so the 64-bit variants are requested too) and records
  each launch the interpreter sees: kernel, argument types, constexpr values and launch
  options. A kernel added or changed tomorrow is therefore covered as soon as an operator
  launches it. The kernels do not run during the capture (their launch is recorded and
  skipped): the launchers choose variants from shapes, dtypes and flags, never from values.
  A pool of fresh processes (without the interpreter) compiles each distinct variant ahead
  of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
  (the launch's num_warps / num_stages / other options kept). Registers and spills come
  from ``ptxas -v`` on the PTX: the log of the ptxas run triton itself makes for the cubin
  (``TRITON_DUMP_PTXAS_LOG``, same binary and flags), or, on a cache hit, a run of that
  ptxas on the cached PTX. Shared memory comes from the compile metadata (Triton's shared
  memory is dynamic: ptxas does not see it).
- **CUDA.** ``nvcc --resource-usage`` on each ``csrc/cuda/*.cu`` (device code for every
  architecture in one call) with the flags and definitions of the CMake build. nvcc
  reports static shared memory only; kernels that also take dynamic shared memory at
  launch (``extern __shared__``) are flagged "+ dynamic" in the table.

Signature specialisation: the Triton JIT on a GPU specialises integer arguments on their
values (``== 1`` becomes a constexpr, divisible by 16 gets ``tt.divisibility``) and pointer
arguments on 16-byte alignment. The values seen at the tiny capture sizes say nothing about
the sizes a GPU run will see, so a variant is compiled in up to two forms that bracket
them: ``plain`` (integers unspecialised: odd sizes such as 7x9x11) and ``aligned`` (every
integer argument the JIT may specialise marked divisible by 16: sizes and strides that are
multiples of 16, as 160x192x224 is). Pointers are 16-byte aligned in both, as CUDA
allocations are. Integers equal to 1 (batch or channel 1) are not compiled as constexprs:
that form only removes work. CI and the script's default compile ``plain`` only
(``CI_FORMS``), to stay within CI's time budget; ``--forms plain aligned`` compiles both.
On a sample of 120 (variant, arch) pairs the two forms differed by at most 11 registers
and never in spills.

Usage::

    python -m benchmarks.compile_gate                   # both halves, tables on stdout
    python -m benchmarks.compile_gate --write-results   # also into benchmarks/RESULTS.md
    python -m benchmarks.compile_gate --triton --forms plain aligned --json /tmp/gate.json
    python -m benchmarks.compile_gate --from-json /tmp/gate.json --write-results  # re-render

Exit status 1 when anything fails to compile, spills or overflows shared memory (minus the
waivers below). ``tests/test_compile_gate.py`` runs the same functions in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
CUDA_SOURCES = ROOT / "csrc" / "cuda"
CUDA_INCLUDE = ROOT / "csrc" / "include"

ARCHS = (80, 90)
# Largest shared memory one block can use (opt-in limit), bytes: 163 KiB on sm_80 (A100),
# 227 KiB on sm_90 (H100).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The capture's second pass lowers _common.IDX64_THRESHOLD to this, so every launcher asks
# for its 64-bit variant at the tiny capture sizes (the tests use the same value).
IDX64_CAPTURE_THRESHOLD = 100
SPEC_FORMS = ("plain", "aligned")
CI_FORMS = ("plain",)

# Kernels allowed to spill or to exceed the shared-memory limit, with the reason. Keys are
# "module:kernel" (Triton) or the demangled kernel name without its argument list (CUDA);
# a value is the reason, stated for the reader of the table. Empty: no kernel needs one.
TRITON_WAIVERS: dict[str, str] = {}
CUDA_WAIVERS: dict[str, str] = {}

BEGIN_MARK = "<!-- compile-gate:begin -->"
END_MARK = "<!-- compile-gate:end -->"


# ======================================================================= resource usage


@dataclass
class Usage:
    """Resources of one compiled kernel on one architecture.

    Attributes:
        kernel: "module:name" (Triton) or the demangled name (CUDA).
        variant: a short summary of the variant (constexprs, argument types, form).
        arch: compute capability, 80 or 90.
        registers: registers per thread (ptxas).
        spill_stores, spill_loads: bytes per thread (ptxas).
        shared: bytes per block (Triton: the compile metadata, dynamic; CUDA: static).
        dynamic_shared: the kernel also takes dynamic shared memory at launch (CUDA only;
            not included in ``shared``).
        error: the compile or ptxas error, when there is one.
        cpu_s: CPU seconds of the compile (Triton), for the gate's time budget.
    """

    kernel: str
    variant: str
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    dynamic_shared: bool = False
    error: str = ""
    cpu_s: float = 0.0  # CPU seconds the compile took (this process and its children)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self) -> list[str]:
        """What this kernel breaks: compile error, spills, shared memory over the limit."""
        out = []
        if self.error:
            out.append("does not compile")
        if self.spills:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and self.shared > limit:
            out.append(f"shared {self.shared} B > {limit} B")
        return out


_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_ARCH = re.compile(r"for '(sm_\w+)'")


def parse_ptxas(log: str) -> dict[str, dict[str, Any]]:
    """Per-entry resources from a ``ptxas -v`` (or ``nvcc --resource-usage``) log.

    Returns:
        {mangled name: {"arch": "sm_90a" or None, "registers", "spill_stores",
        "spill_loads", "shared" (static bytes)}}. With several architectures in one log the
        key is "name@sm_XX".
    """
    out: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m and "Compiling entry function" in line:
            arch = _PTXAS_ARCH.search(line)
            name = m.group(1)
            key = f"{name}@{arch.group(1)}" if arch else name
            current = out.setdefault(key, {"name": name, "arch": arch.group(1) if arch else None,
                                           "registers": 0, "spill_stores": 0, "spill_loads": 0,
                                           "shared": 0})
            continue
        if m and "Function properties for" in line:
            # Properties of a device function (not an entry) come without a "Compiling
            # entry" line; they belong to no kernel of their own.
            name = m.group(1)
            if current is None or current["name"] != name:
                current = None
            continue
        if current is None:
            continue
        if (s := _PTXAS_SPILL.search(line)) is not None:
            current["spill_stores"] = int(s.group(2))
            current["spill_loads"] = int(s.group(3))
        if (u := _PTXAS_USED.search(line)) is not None:
            current["registers"] = int(u.group(1))
            if (sm := _PTXAS_SMEM.search(line)) is not None:
                current["shared"] = int(sm.group(1))
    return out


def failures(usages: Iterable[Usage], waivers: dict[str, str]) -> list[Usage]:
    """The usages with a problem that no waiver covers (see :func:`waived`)."""
    return [u for u in usages if u.problems() and waived(u, waivers) is None]


# ==================================================================== Triton: capture


def _is_constexpr_annotation(annotation: object) -> bool:
    # The kernel modules use `from __future__ import annotations`: annotations are strings.
    if isinstance(annotation, str):
        return "constexpr" in annotation
    return getattr(annotation, "__name__", "") == "constexpr"


def _json_value(value: object) -> object:
    """A constexpr value as JSON (tl.dtype as {"dtype": name})."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} cannot be recorded")


def _from_json_value(value: object) -> object:
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        name = value["dtype"]
        return getattr(tl, name) if hasattr(tl, name) else tl.dtype(name)
    return value


def _record_launch(fn_obj: Any, args: tuple, kwargs: dict) -> dict:
    """One launch as a JSON-able variant record (see :func:`capture_variants`)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = fn_obj.fn
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    params = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = sig.bind(*args, **params)
    bound.apply_defaults()
    no_spec = set(fn_obj.kwargs.get("do_not_specialize") or ())
    record_params = []
    for i, (name, p) in enumerate(sig.parameters.items()):
        value = bound.arguments[name]
        if _is_constexpr_annotation(p.annotation):
            record_params.append({"name": name, "type": "constexpr", "value": _json_value(value)})
            continue
        plain, _ = native_specialize_impl(BaseBackend, value, False, False, False)
        specialise = name not in no_spec and i not in no_spec
        if plain == "constexpr":  # None: the JIT makes it a constexpr whatever the form
            record_params.append({"name": name, "type": "constexpr", "value": None})
            continue
        entry: dict[str, Any] = {"name": name, "type": plain}
        # Pointer alignment is not recorded: a view's offset at the capture's tiny sizes
        # says nothing about a GPU run, and both forms compile pointers as 16-byte aligned.
        if plain[0] in "iu" and plain != "u1":
            entry["specialisable"] = specialise
        record_params.append(entry)
    return {
        "module": fn.__module__,
        "kernel": fn.__name__,
        "params": record_params,
        "options": {k: _json_value(v) for k, v in sorted(options.items())},
    }


def variant_key(record: dict) -> str:
    """Identity of a variant: kernel, parameter types and constexprs, options."""
    return json.dumps([record["module"], record["kernel"], record["params"], record["options"]],
                      sort_keys=True)


class _Recorder:
    """Patches the interpreter's launch to record variants (and skip or run the kernel)."""

    def __init__(self, execute: bool):
        self.execute = execute
        self.variants: dict[str, dict] = {}
        self.launches = 0

    def __enter__(self) -> _Recorder:
        from triton.runtime.interpreter import InterpretedFunction

        self._cls = InterpretedFunction
        self._orig = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                rec = _record_launch(fn_self, args, kwargs)
                recorder.variants.setdefault(variant_key(rec), rec)
                recorder.launches += 1
                if not recorder.execute:
                    return None
            return recorder._orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        self._cls.run = self._orig


# Each case: (operator, label, callable building inputs and running forward + backward).
Case = tuple[str, str, Callable[[], None]]


def _grad_sets(n: int) -> list[tuple[bool, ...]]:
    """Which of n differentiable inputs require grad: none, each alone, all."""
    sets = [tuple([False] * n)]
    sets += [tuple(i == j for j in range(n)) for i in range(n)]
    if n > 1:
        sets.append(tuple([True] * n))
    return sets


def _run(fn: Callable[..., Any], make_inputs: Callable[[], list], grads: Sequence[bool],
         **kw: Any) -> None:
    """fn(*inputs, **kw) on fresh inputs, then a backward through those marked in grads."""
    import torch

    inputs = make_inputs()
    leaves = [x.requires_grad_(True) for x, g in zip(inputs, grads) if g]
    out = fn(*inputs, **kw)
    if leaves:
        weight = torch.rand(out.shape, dtype=out.dtype, device=out.device) + 0.5
        (out * weight).sum().backward()


def _call_each(parts: Sequence[Callable[[], Any]]) -> list:
    return [p() for p in parts]


def operator_cases() -> Iterator[Case]:
    """Every public operator with backend="triton" across its variant-selecting settings.

    Sizes are odd and tiny (the kernels do not run): 2D and 3D, batch and channels > 1, a
    broadcast batch where an operator allows one, and a long last axis for the per-line
    passes (LNCC, Sobel).
    """
    import torch

    import mrus_kernels as mk
    from mrus_kernels import mi as mi_mod
    from mrus_kernels.lncc import lncc_monai

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: Any) -> Any:  # intensities in [0, 1)
        return torch.rand(shape, generator=gen).to(dtype)

    def field(*shape: int, dtype: Any) -> Any:  # displacements in [-1, 1) voxels
        return (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)

    def mask(kind: str | None, *shape: int, dtype: Any) -> Any:
        if kind is None:
            return None
        m = torch.rand(shape, generator=gen)
        return m > 0.3 if kind == "bool" else m.to(dtype)

    def make(*parts: Callable[[], Any]) -> Callable[[], list]:
        # Partials, not lambdas: the cases run after the loops end, and a lambda would
        # see the loop variables' last values.
        return partial(_call_each, parts)

    def cases(op: str, label: str, fn: Callable[..., Any], make_inputs: Callable[[], list],
              **kw: Any) -> Iterator[Case]:
        """One case per grad set of fn's differentiable inputs (all of make_inputs')."""
        n = len(make_inputs())
        for grads in _grad_sets(n):
            yield (op, f"{label} grads={grads}",
                   partial(_run, fn, make_inputs, grads, backend="triton", **kw))

    spatial = {2: (11, 13), 3: (5, 6, 7)}
    long_line = {2: (5, 150), 3: (5, 6, 150)}
    mi_bins = sorted({8, 16, 32, 48, mi_mod.TRITON_MAX_BINS})
    for dtype, (nd, s) in product((torch.float32, torch.float16, torch.bfloat16),
                                  spatial.items()):
        tag = f"{str(dtype).removeprefix('torch.')} {nd}D"
        img1 = partial(rand, 2, 1, *s, dtype=dtype)
        img2 = partial(rand, 2, 3, *s, dtype=dtype)
        ddf = {b: partial(field, b, nd, *s, dtype=dtype) for b in (1, 2)}

        for mode, padding, det, bd in product(("linear", "nearest"), ("zeros", "border"),
                                              (False, True), (2, 1)):
            yield from cases("warp", f"{tag} {mode} {padding} det={det} Bd={bd}", mk.warp,
                             make(img2, ddf[bd]), mode=mode, padding=padding,
                             deterministic=det)
        for padding, det in product(("border", "zeros"), (False, True)):
            yield from cases("compose", f"{tag} {padding} det={det}", mk.compose,
                             make(ddf[2], ddf[2]), padding=padding, deterministic=det)
            for memory in ("store", "recompute"):
                yield from cases("integrate_velocity", f"{tag} {padding} {memory} det={det}",
                                 mk.integrate_velocity, make(ddf[2]), steps=2,
                                 memory=memory, padding=padding, deterministic=det)
        for spacing in (None, tuple(float(i + 1) for i in range(nd))):
            for op in ("jacobian_det", "grad_l2"):
                yield from cases(op, f"{tag} spacing={spacing}", getattr(mk, op),
                                 make(ddf[2]), spacing=spacing)
            yield ("folding_fraction", f"{tag} spacing={spacing}",
                   partial(_run, mk.folding_fraction, make(ddf[2]), (False,),
                           spacing=spacing, backend="triton"))
        for reduction in ("sum", "mean"):
            yield from cases("harmonic_energy", f"{tag} {reduction}", mk.harmonic_energy,
                             make(ddf[2]), reduction=reduction)
        for op in ("bending_energy", "diffusion"):
            yield from cases(op, tag, getattr(mk.regularisers, op), make(ddf[2]),
                             spacing=tuple(float(i + 1) for i in range(nd)))

        # MI family: both windows, bin counts over every padded size up to the triton cap,
        # masks of each kind, fixed (bins 32) and per-image value ranges.
        for kernel, bins, mkind, det in product(("gaussian", "bspline"), mi_bins,
                                                (None, "bool", "float"), (False, True)):
            ops = ["mutual_information"]
            if bins in (32, mi_mod.TRITON_MAX_BINS) and not det:
                ops += ["nmi", "joint_histogram"]
            for op in ops:
                yield from cases(op, f"{tag} {kernel} bins={bins} mask={mkind} det={det}",
                                 getattr(mk, op), make(img1, img1),
                                 bins=bins, kernel=kernel, mask=mask(mkind, 2, 1, *s, dtype=dtype),
                                 value_range=(0.0, 1.0) if bins == 32 else None,
                                 deterministic=det)

        # Sobel (every output, padding and L1 reduction) and LNCC (masks of each kind,
        # broadcast batch, two windows) on a compact and a long shape.
        for shape in (s, long_line[nd]):
            feats = partial(rand, 2, 3, *shape, dtype=dtype)
            for padding in ("replicate", "zeros"):
                for output in ("magnitude", "components"):
                    yield from cases("sobel", f"{tag} {shape} {output} {padding}", mk.sobel,
                                     make(feats), output=output, padding=padding)
                for reduction in ("mean", "sum", "none"):
                    yield from cases("sobel_l1", f"{tag} {shape} {reduction} {padding}",
                                     mk.sobel_l1, make(feats, feats),
                                     reduction=reduction, padding=padding)
            for mkind, window, bm in product((None, "bool", "float"), (3, 5), (2, 1)):
                yield from cases("lncc", f"{tag} {shape} w={window} mask={mkind} Bm={bm}",
                                 mk.lncc, make(partial(rand, 2, 1, *shape, dtype=dtype),
                                               partial(rand, bm, 1, *shape, dtype=dtype)),
                                 window=window, mask=mask(mkind, 2, 1, *shape, dtype=dtype))
            # MONAI's per-window form (FORM=1 variants of the REDUCE and COEFF passes).
            for mkind, window in product((None, "float"), (3, 5)):
                yield from cases("lncc_monai", f"{tag} {shape} w={window} mask={mkind}",
                                 lncc_monai, make(partial(rand, 2, 1, *shape, dtype=dtype),
                                                  partial(rand, 2, 1, *shape, dtype=dtype)),
                                 window=window, smooth_nr=1e-5,
                                 mask=mask(mkind, 2, 1, *shape, dtype=dtype))


IDX64_PASSES = ("default", "lowered")


def capture_variants(*, execute: bool = False, cases: Iterable[Case] | None = None,
                     passes: Sequence[str] = IDX64_PASSES) -> tuple[list[dict], dict[str, Any]]:
    """Drives the operators under the interpreter and returns the distinct kernel variants.

    Must run in a process with ``TRITON_INTERPRET=1`` set before triton was imported.

    Args:
        execute: also run each kernel (slow; the default records and skips the launch).
        cases: the cases to drive (default :func:`operator_cases`).
        passes: "default" drives them with the default 64-bit threshold, "lowered" with
            ``_common.IDX64_THRESHOLD`` lowered to ``IDX64_CAPTURE_THRESHOLD``.

    Returns:
        (variants, info): variants sorted by kernel, each {"module", "kernel", "params":
        [{"name", "type", "value" (constexprs) / "specialisable" (integers)}], "options"};
        info has "launches", "cases" and "errors" (one line per case that raised: an
        operator the capture could not drive is a gate failure).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("capture_variants needs TRITON_INTERPRET=1 set before triton is "
                           "imported")
    from mrus_kernels.triton import _common

    errors: list[str] = []
    n_cases = 0
    case_list = list(cases if cases is not None else operator_cases())
    saved = _common.IDX64_THRESHOLD
    with _Recorder(execute) as rec:
        for name in passes:
            threshold = saved if name == "default" else IDX64_CAPTURE_THRESHOLD
            _common.IDX64_THRESHOLD = threshold
            try:
                for op, label, fn in case_list:
                    n_cases += 1
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 - every failure is reported
                        errors.append(f"{op} [{label}] idx64_threshold={threshold}: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            finally:
                _common.IDX64_THRESHOLD = saved
    variants = sorted(rec.variants.values(),
                      key=lambda r: (r["module"], r["kernel"], variant_key(r)))
    return variants, {"launches": rec.launches, "cases": n_cases, "errors": errors}


def capture_in_subprocess(out_dir: Path, *, execute: bool = False,
                          timeout: float = 1800) -> dict:
    """Runs the capture in fresh interpreter processes, one per 64-bit pass, side by side,
    and returns the merged result (as :func:`capture_variants`, as a dict)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in IDX64_PASSES:
        path = out_dir / f"capture_{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.compile_gate", "--capture-only", str(path),
               "--idx64-pass", name] + (["--execute"] if execute else [])
        procs.append((path, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)))
    merged: dict[str, Any] = {"variants": [], "launches": 0, "cases": 0, "errors": []}
    seen: dict[str, dict] = {}
    failed = []
    for path, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"capture failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
            continue
        part = json.loads(path.read_text())
        for v in part["variants"]:
            seen.setdefault(variant_key(v), v)
        merged["launches"] += part["launches"]
        merged["cases"] += part["cases"]
        merged["errors"] += part["errors"]
    if failed:
        raise RuntimeError("\n".join(failed))
    merged["variants"] = sorted(seen.values(),
                                key=lambda r: (r["module"], r["kernel"], variant_key(r)))
    return merged


# ==================================================================== Triton: compile


def variant_summary(record: dict, form: str | None = None) -> str:
    """Short text of a variant: constexprs that are set, pointer dtypes, 64-bit ints."""
    parts = []
    ptr_types = sorted({p["type"][1:] for p in record["params"] if p["type"].startswith("*")})
    for p in record["params"]:
        if p["type"] == "constexpr" and p.get("value") is not None:
            v = p["value"]
            v = v["dtype"] if isinstance(v, dict) else v
            parts.append(f"{p['name']}={v}")
    parts.append("/".join(ptr_types))
    if any(p["type"] == "i64" for p in record["params"]):
        parts.append("i64 args")
    opts = record["options"]
    if "num_warps" in opts:
        parts.append(f"w{opts['num_warps']}")
    if "num_stages" in opts:
        parts.append(f"s{opts['num_stages']}")
    if form:
        parts.append(form)
    return " ".join(parts)


def _import_kernel_module(record: dict) -> Any:
    """The module of a variant's kernel: by name, or from record["path"] (a kernel file
    outside the package, as the gate's self-tests use)."""
    path = record.get("path")
    if not path:
        return importlib.import_module(record["module"])
    if record["module"] in sys.modules:
        return sys.modules[record["module"]]
    spec = importlib.util.spec_from_file_location(record["module"], path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load kernel module {record['module']} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[record["module"]] = module
    spec.loader.exec_module(module)
    return module


def _ast_source(record: dict, form: str) -> tuple[Any, dict]:
    """(ASTSource, options) of one variant in one specialisation form."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module = _import_kernel_module(record)
    fn = getattr(module, record["kernel"])
    # Autotuner / heuristics wrappers hold the JITFunction in .fn.
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{record['module']}.{record['kernel']} is not a triton.jit kernel")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    if [p["name"] for p in record["params"]] != list(fn.arg_names):
        raise TypeError(f"{record['kernel']}: parameters changed since the capture")
    for i, p in enumerate(record["params"]):
        ty = p["type"]
        signature[p["name"]] = ty
        if ty == "constexpr":
            constexprs[p["name"]] = _from_json_value(p.get("value"))
        elif ty.startswith("*"):
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif form == "aligned" and p.get("specialisable"):
            attrs[(i,)] = BaseBackend.parse_attr("D")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), \
        dict(record["options"])


def _triton_ptxas(arch: int) -> str:
    """Path of the ptxas triton itself uses for this architecture (else nvcc's)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure falls back to the CUDA toolkit's
        pass
    found = shutil.which("ptxas") or (
        os.path.join(os.path.dirname(shutil.which("nvcc") or ""), "ptxas") if shutil.which("nvcc")
        else None)
    if not found or not os.path.exists(found):
        raise FileNotFoundError("no ptxas: neither triton's nor the CUDA toolkit's was found")
    return found


def ptxas_usage(ptx: str, arch: int, *, fmad: bool = True) -> dict[str, dict[str, Any]]:
    """Runs ptxas -v on PTX text for its own .target (sm_90a for 90) and parses the log."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    gpu = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [_triton_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
               str(src), "-o", str(Path(tmp) / "k.cubin")]
        if not fmad:
            cmd.insert(1, "--fmad=false")
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return parse_ptxas(proc.stdout + proc.stderr)


def compile_variant(job: tuple[dict, str, int]) -> dict:
    """Compiles one (variant, form, arch) and returns its Usage as a dict (never raises)."""
    record, form, arch = job
    name = f"{record['module']}:{record['kernel']}"
    usage = Usage(kernel=name, variant=variant_summary(record, form), arch=arch)
    cpu0 = _cpu_seconds()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        src, options = _ast_source(record, form)
        # Triton runs ptxas -v itself for the cubin; with TRITON_DUMP_PTXAS_LOG (set in the
        # worker) it prints that log, which has the numbers of exactly that invocation.
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        usage.shared = int(k.metadata.shared)
        entries = parse_ptxas(log.getvalue())
        if not entries:  # a cache hit compiles nothing: run ptxas on the PTX ourselves
            entries = ptxas_usage(k.asm["ptx"], arch,
                                  fmad=options.get("enable_fp_fusion", True))
        if len(entries) != 1:
            raise RuntimeError(f"expected one entry in the ptxas log, got {sorted(entries)}")
        (info,) = entries.values()
        usage.registers = info["registers"]
        usage.spill_stores = info["spill_stores"]
        usage.spill_loads = info["spill_loads"]
        usage.shared += info["shared"]
    except Exception as exc:  # noqa: BLE001 - the gate reports it as a failure
        usage.error = _error_text(exc)
    usage.cpu_s = round(_cpu_seconds() - cpu0, 3)
    return asdict(usage)


def _error_text(exc: BaseException) -> str:
    """The exception and its cause; triton's CompilationError puts the source excerpt
    first and the reason last, so the tail is kept."""
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    if exc.__cause__ is not None:
        text += f"\ncaused by {type(exc.__cause__).__name__}: {str(exc.__cause__).strip()}"
    return text if len(text) <= 3000 else "..." + text[-3000:]


def _error_summary(error: str) -> str:
    """One line of an error for a table: its last non-empty line (the reason)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    head = error.split(":", 1)[0]
    last = lines[-1] if lines else ""
    text = last if last.startswith(head) else f"{head}: {last}"
    return text.replace("|", "\\|")[:240]


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _clean_worker_env() -> None:
    # The compile workers must see the real triton.jit, not the interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def compile_variants(variants: Sequence[dict], *, archs: Sequence[int] = ARCHS,
                     forms: Sequence[str] = SPEC_FORMS, jobs: int = 2) -> list[Usage]:
    """AOT-compiles every variant in every form for every architecture, in a process pool.

    The pool's processes are started fresh ("spawn") with TRITON_INTERPRET removed, so this
    works from a process that runs the interpreter itself (pytest here).
    """
    import multiprocessing

    work = [(v, f, a) for v in variants for f in forms for a in archs]
    # Longest first (MI's big bins, Sobel backward) so the pool does not end on one of them.
    work.sort(key=lambda j: -_cost_hint(j[0]))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx,
                             initializer=_clean_worker_env) as pool:
        results = list(pool.map(compile_variant, work, chunksize=1))
    return [Usage(**r) for r in results]


def _cost_hint(record: dict) -> int:
    return sum(int(p["value"]) for p in record["params"]
               if p["type"] == "constexpr" and isinstance(p.get("value"), int)
               and not isinstance(p.get("value"), bool))


# ======================================================================= CUDA (nvcc)


def nvcc_path() -> str | None:
    """nvcc on PATH, or under CUDA_HOME / /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "unknown"


def _demangle(names: Sequence[str], nvcc: str) -> dict[str, str]:
    """Demangled names (cu++filt beside nvcc, else c++filt; unchanged when neither exists)."""
    tool = None
    for cand in (os.path.join(os.path.dirname(nvcc), "cu++filt"), shutil.which("cu++filt"),
                 shutil.which("c++filt")):
        if cand and os.path.exists(cand):
            tool = cand
            break
    if tool is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def _kernel_key(demangled: str) -> str:
    """A demangled kernel name without return type, anonymous namespace and parameters:
    "void ns::(anonymous namespace)::k<3, float>(Args, float*)" -> "ns::k<3, float>"."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void\s+", "", name)
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i]
    return name


def _dynamic_shared_kernels(source: str) -> set[str]:
    """Names of __global__ functions in a .cu source whose body declares extern __shared__."""
    names = set()
    for g in re.finditer(r"\b__global__\b", source):
        # The kernel's name: the first identifier followed by "(" that is not an attribute.
        name = None
        for m in re.finditer(r"(\w+)\s*\(", source[g.end():]):
            if not m.group(1).startswith("__"):
                name, rest = m.group(1), g.end() + m.end()
                break
        if name is None:
            continue
        body_start = source.find("{", rest)
        semicolon = source.find(";", rest)
        if body_start < 0 or 0 <= semicolon < body_start:  # a declaration, no body
            continue
        depth, i = 0, body_start
        while i < len(source):
            if source[i] == "{":
                depth += 1
            elif source[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if "extern __shared__" in source[body_start:i]:
            names.add(name)
    return names


def cuda_flags(archs: Sequence[int], nvcc: str) -> list[str]:
    """nvcc flags of the gate: the CMake build's CUDA flags and definitions (CMakeLists.txt:
    C++17, -O3, MRUS_WITH_CUDA and the two informational strings), device code only (a
    fatbin: the host half is the CMake build's business), one -gencode per architecture."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ["-std=c++17", "-O3", "-fatbin", *gencode, "--resource-usage",
            f"-I{CUDA_INCLUDE}", "-DMRUS_WITH_CUDA",
            f'-DMRUS_CUDA_ARCHS="{",".join(map(str, archs))}"',
            f'-DMRUS_CUDA_VERSION="{nvcc_version(nvcc)}"']


def compile_cuda_file(job: tuple[str, tuple[int, ...], str]) -> list[dict]:
    """nvcc --resource-usage on one .cu for every arch; one Usage dict per kernel and arch
    (never raises: a compile error is a Usage with its error)."""
    path, archs, nvcc = job
    src = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *cuda_flags(archs, nvcc), str(src), "-o", str(Path(tmp) / "k.fatbin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [asdict(Usage(kernel=src.name, variant=src.name, arch=a,
                             error=f"nvcc failed ({proc.returncode}): {log.strip()[-1500:]}"))
                for a in archs]
    entries = parse_ptxas(log)
    demangled = _demangle(sorted({e["name"] for e in entries.values()}), nvcc)
    dynamic = _dynamic_shared_kernels(src.read_text())
    out = []
    for e in entries.values():
        key = _kernel_key(demangled[e["name"]])
        base = re.sub(r"<.*", "", key).split("::")[-1]
        arch = int(re.sub(r"\D", "", e["arch"] or "0") or 0)
        out.append(asdict(Usage(kernel=key, variant=src.name, arch=arch,
                                registers=e["registers"], spill_stores=e["spill_stores"],
                                spill_loads=e["spill_loads"], shared=e["shared"],
                                dynamic_shared=base in dynamic)))
    missing = set(archs) - {u["arch"] for u in out}
    for a in sorted(missing):
        out.append(asdict(Usage(kernel=src.name, variant=src.name, arch=a,
                                error="nvcc reported no kernel for this arch")))
    return out


def compile_cuda(*, archs: Sequence[int] = ARCHS, jobs: int = 2,
                 sources: Sequence[Path] | None = None) -> list[Usage]:
    """Compiles every csrc/cuda/*.cu (or `sources`) for every architecture, files in
    parallel; raises FileNotFoundError without nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    files = sorted(sources if sources is not None else CUDA_SOURCES.glob("*.cu"))
    work = [(str(f), tuple(archs), nvcc) for f in files]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(compile_cuda_file, work, chunksize=1))
    return [Usage(**u) for batch in results for u in batch]


# ============================================================================= tables


def _fmt_bytes(n: int) -> str:
    return f"{n}" if n < 1024 else f"{n} ({n / 1024:.1f} KiB)"


def _base_name(kernel: str) -> str:
    """"mod:k" -> "k"; "ns::k<3, float>" -> "k"."""
    name = kernel if "::" in kernel else kernel.split(":")[-1]
    return re.sub(r"<.*", "", name).split("::")[-1]


def waived(u: Usage, waivers: dict[str, str]) -> str | None:
    """The waiver reason that covers `u` (its kernel, or its name without template
    arguments), or None."""
    for key in (u.kernel, re.sub(r"<.*", "", u.kernel)):
        if key in waivers:
            return waivers[key]
    return None


def _aggregate_table(usages: Sequence[Usage], waivers: dict[str, str], what: str,
                     where: Callable[[Usage], str]) -> str:
    """Markdown: one row per kernel (template instances and variants together) and arch,
    the worst value of each column over them."""
    groups: dict[tuple[str, str, int], list[Usage]] = {}
    for u in usages:
        groups.setdefault((where(u), _base_name(u.kernel), u.arch), []).append(u)
    rows = []
    for (place, name, arch), us in sorted(groups.items()):
        ok = [u for u in us if not u.error]
        reg = max(ok, key=lambda u: u.registers, default=None)
        spill = max(ok, key=lambda u: (u.spills, u.spill_stores), default=None)
        shared = max(ok, key=lambda u: u.shared, default=None)
        bad = [u for u in us if u.problems()]
        reasons = {waived(u, waivers) for u in bad}
        if not bad:
            status = "ok"
        elif None not in reasons:
            status = "waived: " + "; ".join(sorted(r for r in reasons if r))
        else:
            status = f"**{sum(1 for u in bad if waived(u, waivers) is None)} failing**"
        dyn = " + dynamic" if any(u.dynamic_shared for u in us) else ""
        rows.append(
            f"| `{name}` | {place} | {len(us)} | sm_{arch} | "
            f"{reg.registers if reg else '-'} | "
            f"{f'{spill.spill_stores} / {spill.spill_loads}' if spill else '-'} | "
            f"{_fmt_bytes(shared.shared) if shared else '-'}{dyn} | "
            f"{reg.variant if reg and what == 'variants' else (reg.kernel if reg else '-')} | "
            f"{status} |")
    head = (f"| kernel | {'module' if what == 'variants' else 'file'} | {what} | arch | "
            f"max registers | max spill stores / loads B | max shared B | "
            f"{'variant' if what == 'variants' else 'instance'} with most registers | status |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def triton_table(usages: Sequence[Usage], waivers: dict[str, str] = TRITON_WAIVERS) -> str:
    """Markdown: one row per Triton kernel and arch, the worst over its variants and forms."""
    return _aggregate_table(usages, waivers, "variants",
                            lambda u: u.kernel.split(":")[0].removeprefix("mrus_kernels."))


def cuda_table(usages: Sequence[Usage], waivers: dict[str, str] = CUDA_WAIVERS) -> str:
    """Markdown: one row per CUDA kernel and arch, the worst over its template instances
    (static shared memory; "+ dynamic" where the kernel also takes some at launch)."""
    return _aggregate_table(usages, waivers, "instances", lambda u: u.variant)


def offenders_table(usages: Sequence[Usage]) -> str:
    """Markdown: every failing (kernel, variant, arch) with its numbers and problem."""
    rows = [f"| `{u.kernel}` | {u.variant} | sm_{u.arch} | {u.registers} | "
            f"{u.spill_stores} / {u.spill_loads} | {u.shared} | "
            f"{'; '.join(u.problems())}{(': ' + _error_summary(u.error)) if u.error else ''} |"
            for u in usages]
    return ("| kernel | variant | arch | registers | spill stores / loads | shared | problem |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def write_results(section: str, path: Path = RESULTS_MD) -> None:
    """Puts `section` between the compile-gate markers of RESULTS.md (appended if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN_MARK}\n{section.rstrip()}\n{END_MARK}"
    if BEGIN_MARK in text and END_MARK in text:
        start = text.index(BEGIN_MARK)
        end = text.index(END_MARK) + len(END_MARK)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# =============================================================================== main


def _versions() -> dict[str, str]:
    out = {}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "absent"
    nvcc = nvcc_path()
    out["nvcc"] = nvcc_version(nvcc) if nvcc else "absent"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_gate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--triton", action="store_true", help="only the Triton half")
    parser.add_argument("--cuda", action="store_true", help="only the CUDA half")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--forms", nargs="+", default=list(CI_FORMS), choices=SPEC_FORMS,
                        help="signature forms to compile (default: plain, as CI)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--execute", action="store_true",
                        help="run the kernels during the capture (slow; checks the capture)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write the tables into {RESULTS_MD.relative_to(ROOT)}")
    parser.add_argument("--json", type=Path, help="write every usage row as JSON here")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="render the report of an earlier --json run (compiles nothing)")
    # Internal: one capture subprocess (see capture_in_subprocess).
    parser.add_argument("--capture-only", type=Path, metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--idx64-pass", choices=IDX64_PASSES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.capture_only is not None:
        passes = [args.idx64_pass] if args.idx64_pass else IDX64_PASSES
        variants, info = capture_variants(execute=args.execute, passes=passes)
        args.capture_only.write_text(json.dumps({"variants": variants, **info}))
        return 0

    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
    else:
        data = run_gate(args)
    report, failed = render(data)
    print(report)
    if args.json and args.from_json is None:
        args.json.write_text(json.dumps(data, indent=1))
    if args.write_results:
        write_results(report)
    return 1 if failed else 0


def run_gate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the requested halves; returns every usage row plus what the report names."""
    do_triton = args.triton or not args.cuda
    do_cuda = args.cuda or not args.triton
    t0 = time.time()
    data: dict[str, Any] = {"archs": list(args.arch), "forms": list(args.forms),
                            "jobs": args.jobs, "date": datetime.date.today().isoformat(),
                            "versions": _versions()}
    if do_triton:
        with tempfile.TemporaryDirectory() as tmp:
            cap = capture_in_subprocess(Path(tmp), execute=args.execute)
        t_cap = time.time() - t0
        for e in cap["errors"]:
            print(f"capture error: {e}", file=sys.stderr)
        usages = compile_variants(cap["variants"], archs=args.arch, forms=args.forms,
                                  jobs=args.jobs)
        data["capture"] = {k: cap[k] for k in ("launches", "cases", "errors")}
        data["capture"]["variants"] = len(cap["variants"])
        data["triton"] = [asdict(u) for u in usages]
        print(f"triton: capture {t_cap:.0f} s, compile {time.time() - t0 - t_cap:.0f} s "
              f"({sum(u.cpu_s for u in usages):.0f} CPU-s), {len(usages)} compiles, "
              f"{len(failures(usages, TRITON_WAIVERS))} failing", file=sys.stderr)
    if do_cuda:
        t1 = time.time()
        try:
            cu = compile_cuda(archs=args.arch, jobs=args.jobs)
        except FileNotFoundError as exc:
            data["cuda_skipped"] = str(exc)
        else:
            data["cuda"] = [asdict(u) for u in cu]
            print(f"cuda: {time.time() - t1:.0f} s, {len(cu)} kernels, "
                  f"{len(failures(cu, CUDA_WAIVERS))} failing", file=sys.stderr)
    data["wall_s"] = round(time.time() - t0, 1)
    data["cpu_s"] = round(_cpu_seconds(), 1)
    return data


def render(data: dict[str, Any]) -> tuple[str, bool]:
    """The Markdown report of :func:`run_gate`'s result, and whether the gate fails."""
    failed = False
    sections = []
    if "triton" in data:
        usages = [Usage(**u) for u in data["triton"]]
        cap = data.get("capture", {})
        bad = failures(usages, TRITON_WAIVERS)
        failed |= bool(bad) or bool(cap.get("errors"))
        text = (f"### Triton kernels\n\n{cap.get('variants', '?')} distinct variants from "
                f"{cap.get('launches', '?')} launches of {cap.get('cases', '?')} operator calls "
                f"under the interpreter, compiled in the {', '.join(data.get('forms', []))} "
                f"form{'s' if len(data.get('forms', [])) > 1 else ''}: {len(usages)} compiles."
                f"\n\n" + triton_table(usages))
        if cap.get("errors"):
            text += ("\n\nOperator calls the capture could not make:\n\n"
                     + "\n".join(f"- {e}" for e in cap["errors"][:20]))
        if bad:
            text += "\n\nOffenders:\n\n" + offenders_table(bad)
        sections.append(text)
    if "cuda" in data:
        cu = [Usage(**u) for u in data["cuda"]]
        bad = failures(cu, CUDA_WAIVERS)
        failed |= bool(bad)
        text = ("### CUDA kernels\n\n`nvcc --resource-usage`, device code of each "
                "`csrc/cuda/*.cu`; static shared memory (\"+ dynamic\": the kernel also takes "
                "shared memory sized at launch, not included).\n\n" + cuda_table(cu))
        if bad:
            text += "\n\nOffenders:\n\n" + offenders_table(bad)
        sections.append(text)
    elif "cuda_skipped" in data:
        sections.append(f"### CUDA kernels\n\nnot checked: {data['cuda_skipped']}")
    v = data.get("versions", {})
    archs = " and ".join(f"sm_{a}" for a in data.get("archs", ARCHS))
    waivers = {**TRITON_WAIVERS, **CUDA_WAIVERS}
    header = (
        f"## Compile gate: every GPU kernel compiled for {archs} (no GPU)\n\n"
        f"{data.get('date', '?')}; triton {v.get('triton', '?')} (its own ptxas for the "
        f"Triton kernels), nvcc {v.get('nvcc', '?')}. Regenerate with `python -m "
        f"benchmarks.compile_gate --write-results` ({data.get('wall_s', 0):.0f} s wall, "
        f"{data.get('cpu_s', 0):.0f} CPU-s with {data.get('jobs', '?')} compile processes on "
        f"the shared development VM); `tests/test_compile_gate.py` runs the same checks in "
        f"CI. Each row is the worst value over a kernel's variants (Triton: constexprs, "
        f"pointer dtypes, signature form) or template instances (CUDA). A kernel fails on a "
        f"compile error, any spill, or shared memory above the per-block limit (sm_80 "
        f"{SHARED_LIMIT[80]} B, sm_90 {SHARED_LIMIT[90]} B). Waivers: "
        + ("; ".join(f"`{k}`: {r}" for k, r in waivers.items()) if waivers else "none")
        + ".\n\n"
        + ("**Status: failing** (offenders listed under each table)." if failed
           else "**Status: pass**: no compile error, no spill, no shared memory over the "
                "limit."))
    return _wrap(header) + "\n\n" + "\n\n".join(_wrap(x) for x in sections), failed


def _wrap(markdown: str, width: int = 92) -> str:
    """Fills the prose paragraphs of `markdown` to `width` columns (tables, headings and
    list items stay as they are), as the rest of RESULTS.md is written."""
    out = []
    for para in markdown.split("\n\n"):
        if para.startswith(("|", "#", "- ")):
            out.append(para)
        else:
            out.append(textwrap.fill(para, width, break_on_hyphens=False,
                                     break_long_words=False))
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
