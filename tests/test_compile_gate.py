"""The compile gate in CI: every GPU kernel compiled for sm_80 and sm_90 without a GPU.

The Triton half runs whenever triton is installed, the CUDA half whenever nvcc is found
(CI has both). One capture (an interpreter subprocess driving every operator) and one
compile pool serve all the Triton tests; the pool also compiles two deliberately bad
kernels, so the same run proves the detector flags spills and shared memory over the
limit. ``python -m benchmarks.compile_gate`` prints the same tables (see its docstring).
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from benchmarks import compile_gate as gate

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
needs_nvcc = pytest.mark.skipif(gate.nvcc_path() is None,
                                reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")

# ------------------------------------------------------------------ recorded ptxas output

# ptxas -v output of triton 3.9 (sm_90a) for a kernel that spills, and nvcc
# --resource-usage output for two kernels (one with static shared memory).
PTXAS_SPILL_LOG = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'spill_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for spill_kernel
    880 bytes stack frame, 1192 bytes spill stores, 1228 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 0 barriers, 880 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 1949.514 ms
"""

NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z10red_kernelPKfPfx' for 'sm_80'
ptxas info    : Function properties for _Z10red_kernelPKfPfx
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 1024 bytes smem, 376 bytes cmem[0]
ptxas info    : Function properties for _Z6helperf
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z4big2Pf' for 'sm_80'
ptxas info    : Function properties for _Z4big2Pf
    40 bytes stack frame, 36 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_ptxas_flags_spills() -> None:
    entries = gate.parse_ptxas(PTXAS_SPILL_LOG)
    assert list(entries) == ["spill_kernel@sm_90a"]
    e = entries["spill_kernel@sm_90a"]
    assert (e["registers"], e["spill_stores"], e["spill_loads"]) == (255, 1192, 1228)
    u = gate.Usage(kernel="m:spill_kernel", variant="", arch=90, registers=e["registers"],
                   spill_stores=e["spill_stores"], spill_loads=e["spill_loads"])
    assert u.problems() == ["spills 1192 B stores / 1228 B loads"]
    assert gate.failures([u], {}) == [u]
    assert gate.failures([u], {"m:spill_kernel": "reason"}) == []


def test_parse_nvcc_resource_usage() -> None:
    entries = gate.parse_ptxas(NVCC_LOG)
    # The device function's properties (no "Compiling entry") belong to no kernel.
    assert sorted(entries) == ["_Z10red_kernelPKfPfx@sm_80", "_Z4big2Pf@sm_80"]
    red = entries["_Z10red_kernelPKfPfx@sm_80"]
    assert (red["registers"], red["spill_stores"], red["spill_loads"], red["shared"]) == \
        (18, 0, 0, 1024)
    big = entries["_Z4big2Pf@sm_80"]
    assert (big["registers"], big["spill_stores"], big["spill_loads"], big["shared"]) == \
        (32, 36, 44, 0)


def test_shared_memory_limit_per_arch() -> None:
    # 200 KiB fits sm_90 (227 KiB) but not sm_80 (163 KiB); one byte over each limit fails.
    assert gate.Usage("k", "", 80, shared=200 * 1024).problems() == [
        f"shared {200 * 1024} B > {166912} B"]
    assert gate.Usage("k", "", 90, shared=200 * 1024).problems() == []
    assert gate.Usage("k", "", 80, shared=166912).problems() == []
    assert gate.Usage("k", "", 90, shared=232449).problems() != []
    assert gate.Usage("k", "", 90, error="CompilationError").problems() == ["does not compile"]


def test_write_results_replaces_only_the_marked_section(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## GPU\n\nkeep me\n")
    gate.write_results("## Compile gate\n\nfirst", md)
    gate.write_results("## Compile gate\n\nsecond", md)
    text = md.read_text()
    assert text.startswith("# Results\n\n## GPU\n\nkeep me\n")
    assert "second" in text and "first" not in text
    assert text.count(gate.BEGIN_MARK) == 1 and text.count(gate.END_MARK) == 1


def test_dynamic_shared_detection() -> None:
    src = textwrap.dedent("""
        template <int K>
        __global__ void __launch_bounds__(256) a_kernel(float* x) {
          extern __shared__ float s[];
          if (x) { s[0] = 1.f; }
        }
        __global__ void c_kernel(float* x);
        __global__ void b_kernel(float* x) { __shared__ float t[4]; t[0] = x[0]; }
        __global__ void c_kernel(float* x) { extern __shared__ float u[]; u[0] = x[0]; }
    """)
    assert gate._dynamic_shared_kernels(src) == {"a_kernel", "c_kernel"}


# --------------------------------------------------------------------------- Triton

# Two kernels the gate must reject: one limited to 24 registers (spills), one whose
# software-pipelined tl.dot needs 256-320 KiB of shared memory (over both limits).
SELFTEST_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def gate_spill_kernel(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + r * C + c)
    s = tl.sum(x * x, 1)
    m = tl.max(tl.exp(x) * s[:, None], 0)
    tl.store(y_ptr + r * C + c, x / m[None, :] + s[:, None])


@triton.jit
def gate_shared_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BK: tl.constexpr):
    m = tl.arange(0, BM)[:, None]
    n = tl.arange(0, BM)[None, :]
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BM), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + m * K + (k0 + kk)[None, :])
        b = tl.load(b_ptr + (k0 + kk)[:, None] * BM + n)
        acc += tl.dot(a, b)
    tl.store(c_ptr + m * BM + n, acc)
'''


def _selftest_records(path: Path) -> list[dict]:
    mod = "mrus_compile_gate_selftest"

    def ptr(name: str, ty: str) -> dict:
        return {"name": name, "type": ty}

    def const(name: str, value: int) -> dict:
        return {"name": name, "type": "constexpr", "value": value}

    return [
        {"module": mod, "path": str(path), "kernel": "gate_spill_kernel",
         "params": [ptr("x_ptr", "*fp32"), ptr("y_ptr", "*fp32"), const("R", 16),
                    const("C", 64)],
         "options": {"num_warps": 1, "maxnreg": 24}},
        {"module": mod, "path": str(path), "kernel": "gate_shared_kernel",
         "params": [ptr("a_ptr", "*fp16"), ptr("b_ptr", "*fp16"), ptr("c_ptr", "*fp32"),
                    {"name": "K", "type": "i32", "specialisable": True}, const("BM", 128),
                    const("BK", 256)],
         "options": {"num_warps": 8, "num_stages": 4}},
    ]


@pytest.fixture(scope="session")
def triton_capture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    return gate.capture_in_subprocess(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="session")
def triton_usages(triton_capture: dict, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[list[gate.Usage], list[gate.Usage]]:
    """(operator kernels, self-test kernels): one process pool compiles both."""
    path = tmp_path_factory.mktemp("gate_kernels") / "gate_selftest_kernels.py"
    path.write_text(SELFTEST_KERNELS)
    selftest = _selftest_records(path)
    usages = gate.compile_variants(triton_capture["variants"] + selftest, forms=gate.CI_FORMS,
                                   jobs=2)
    own = [u for u in usages if u.kernel.startswith("mrus_compile_gate_selftest:")]
    ops = [u for u in usages if not u.kernel.startswith("mrus_compile_gate_selftest:")]
    return ops, own


@needs_triton
def test_capture_drives_every_operator(triton_capture: dict) -> None:
    assert triton_capture["errors"] == [], "\n".join(triton_capture["errors"])
    variants = triton_capture["variants"]
    modules = {v["module"] for v in variants}
    triton_dir = Path(gate.ROOT, "mrus_kernels", "triton")
    expected = {f"mrus_kernels.triton.{p.stem}" for p in triton_dir.glob("*.py")
                if not p.stem.startswith("_") and "@triton.jit" in p.read_text()}
    assert expected <= modules, f"no launch captured from {sorted(expected - modules)}"
    # Every kernel with a 64-bit switch was captured with it on and off.
    for kernel in {(v["module"], v["kernel"]) for v in variants}:
        idx = {p.get("value") for v in variants if (v["module"], v["kernel"]) == kernel
               for p in v["params"] if p["name"] == "IDX64"}
        assert idx in (set(), {False, True}), f"{kernel}: IDX64 variants captured: {idx}"


@needs_triton
def test_gate_flags_spilling_and_shared_overflowing_kernels(triton_usages) -> None:
    _, own = triton_usages
    by_kernel = {(u.kernel.split(":")[1], u.arch): u for u in own if u.variant.endswith("plain")}
    for arch in gate.ARCHS:
        spill = by_kernel[("gate_spill_kernel", arch)]
        assert not spill.error, spill.error
        assert spill.spill_stores > 0 and spill.spill_loads > 0, spill
        shared = by_kernel[("gate_shared_kernel", arch)]
        assert not shared.error, shared.error
        assert shared.shared > gate.SHARED_LIMIT[arch], shared
        assert any(p.startswith("shared") for p in shared.problems())
    assert len(gate.failures(own, {})) == len(own)


@needs_triton
def test_triton_kernels_compile_without_spills(triton_usages) -> None:
    ops, _ = triton_usages
    assert ops, "no Triton kernel was compiled"
    bad = gate.failures(ops, gate.TRITON_WAIVERS)
    assert not bad, "Triton kernels that fail the gate:\n" + gate.offenders_table(bad)


@needs_triton
def test_triton_waivers_name_real_kernels(triton_usages) -> None:
    ops, _ = triton_usages
    names = {u.kernel for u in ops}
    for kernel, reason in gate.TRITON_WAIVERS.items():
        assert kernel in names, f"waiver for {kernel}, which no operator launches"
        assert reason.strip(), f"waiver for {kernel} states no reason"


# ----------------------------------------------------------------------------- CUDA

CUDA_SPILL_SOURCE = r"""
// 64 values kept live across a loop with at most 32 registers per thread: must spill.
__global__ void __launch_bounds__(1024, 2) gate_spill_kernel(const float* x, float* y, int n) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * 1024];
  for (int k = 0; k < n; ++k) {
#pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = v[i] * v[(i + 1) % 64] + v[(i + 7) % 64];
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += v[i] * (i + 1);
  y[threadIdx.x] = s;
}
"""


@pytest.fixture(scope="session")
def cuda_usages(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[gate.Usage], list[gate.Usage]]:
    if gate.nvcc_path() is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    spill = tmp_path_factory.mktemp("gate_cuda") / "gate_selftest.cu"
    spill.write_text(CUDA_SPILL_SOURCE)
    sources = sorted(gate.CUDA_SOURCES.glob("*.cu")) + [spill]
    usages = gate.compile_cuda(jobs=2, sources=sources)
    own = [u for u in usages if u.variant == spill.name]
    return [u for u in usages if u.variant != spill.name], own


@needs_nvcc
def test_cuda_gate_flags_a_spilling_kernel(cuda_usages) -> None:
    _, own = cuda_usages
    assert sorted(u.arch for u in own) == sorted(gate.ARCHS), own
    for u in own:
        assert u.kernel == "gate_spill_kernel", u
        assert u.spill_stores > 0 and u.registers <= 32, u
    assert gate.failures(own, {}) == own


@needs_nvcc
def test_cuda_kernels_compile_without_spills(cuda_usages) -> None:
    ops, _ = cuda_usages
    files = {p.name for p in gate.CUDA_SOURCES.glob("*.cu")}
    seen = {u.variant for u in ops}
    assert files <= seen, f"no kernel reported for {sorted(files - seen)}"
    bad = gate.failures(ops, gate.CUDA_WAIVERS)
    assert not bad, "CUDA kernels that fail the gate:\n" + gate.offenders_table(bad)
    assert {u.arch for u in ops} == set(gate.ARCHS)


def test_capture_json_round_trips(tmp_path: Path) -> None:
    # The capture subprocess hands its variants over as JSON: keys must survive it.
    rec = {"module": "m", "kernel": "k", "options": {"num_warps": 4},
           "params": [{"name": "x", "type": "*fp32"}, {"name": "B", "type": "constexpr",
                                                        "value": 128}]}
    path = tmp_path / "cap.json"
    path.write_text(json.dumps({"variants": [rec]}))
    back = json.loads(path.read_text())["variants"][0]
    assert gate.variant_key(back) == gate.variant_key(rec)
    assert gate.variant_summary(back, "plain") == "B=128 fp32 w4 plain"


def test_render_reports_offenders_and_status() -> None:
    ok = gate.Usage("mrus_kernels.triton.warp:_k", "BLOCK=256 fp32 plain", 90, registers=40)
    spill = gate.Usage("mrus_kernels.triton.warp:_k", "BLOCK=512 fp32 plain", 80,
                       registers=255, spill_stores=8, spill_loads=4)
    cuda = gate.Usage("mrus::cuda::k<3, float>", "k.cu", 90, registers=30, shared=2048,
                      dynamic_shared=True)
    data = {"archs": [80, 90], "forms": ["plain"], "jobs": 2, "date": "2026-01-01",
            "versions": {"triton": "3.9.0", "nvcc": "13.0"},
            "capture": {"variants": 2, "launches": 5, "cases": 3, "errors": []},
            "triton": [vars(ok), vars(spill)], "cuda": [vars(cuda)]}
    report, failed = gate.render(data)
    assert failed
    assert "**Status: failing**" in report
    assert "spills 8 B stores / 4 B loads" in report and "BLOCK=512 fp32 plain" in report
    assert "| `k` | k.cu | 1 | sm_90 | 30 | 0 / 0 | 2048 (2.0 KiB) + dynamic |" in report
    data["triton"] = [vars(ok)]
    report, failed = gate.render(data)
    assert not failed and "**Status: pass**" in report and "Offenders" not in report
