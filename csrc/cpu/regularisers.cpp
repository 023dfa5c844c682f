// OpenMP loops of the regularisers (grad_l2, harmonic_energy, bending_energy, diffusion)
// over the shared per-voxel math (csrc/include/regularisers.h). One pass reads u once; the
// forward sums per (b, c, d) plane in double and adds the planes in fixed order (bitwise
// reproducible).
#include <algorithm>
#include <array>
#include <initializer_list>
#include <memory>
#include <utility>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "registry.h"
#include "regularisers.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using reg::RegArgs;

// The loops run row by row along W. Neighbour rows outside the volume are replaced by the
// row itself (a zero difference, grad_l2) or by a row of zeros (harmonic), so the inner
// loops have no branches and vectorise; the first and last voxel of a row take the shared
// per-voxel math (csrc/include/regularisers.h).

// Row pointers of the neighbours of row (d, h) of one plane along D and H, or `outside`
// where the neighbour lies outside the volume (and along D for 2D fields).
template <typename T>
struct RowNeighbours {
  const T *dm, *dp, *hm, *hp;
};

template <typename T>
RowNeighbours<T> neighbours(const RegArgs& a, const T* row, int64_t d, int64_t h,
                            const T* outside) {
  const int64_t hw = a.H * a.W;
  const bool three = a.ndim == 3;
  RowNeighbours<T> n;
  n.dm = three && d >= 1 ? row - hw : outside;
  n.dp = three && d <= a.D - 2 ? row + hw : outside;
  n.hm = h >= 1 ? row - a.W : outside;
  n.hp = h <= a.H - 2 ? row + a.W : outside;
  return n;
}

// Bending and diffusion as lists of weighted stencil terms S_t(y) = Σ_k c_k u(y + o_k)
// (E = Σ_t w_t Σ_{y interior} S_t(y)²), each evaluated along a row in a branch-free,
// vectorised loop; the gradient gathers 2 w_t c_k S_t(x − o_k) over the terms and taps
// (stencil_backward).
struct Term {
  int n = 0;                   // taps: 2 (central difference), 3 (second), 4 (mixed)
  int od[4], oh[4], ow[4];     // tap offsets o_k along D, H, W
  int64_t off[4];              // the same offsets in elements
  double c[4];
  double w = 0.0;
};

std::vector<Term> stencil_terms(const RegArgs& a) {
  std::vector<Term> terms;
  const int64_t stride[3] = {a.H * a.W, a.W, 1};
  auto add = [&](double w, std::initializer_list<std::pair<std::array<int, 3>, double>> taps) {
    Term t;
    t.w = w;
    for (const auto& tap : taps) {
      const int k = t.n++;
      t.od[k] = tap.first[0];
      t.oh[k] = tap.first[1];
      t.ow[k] = tap.first[2];
      t.off[k] = t.od[k] * stride[0] + t.oh[k] * stride[1] + t.ow[k] * stride[2];
      t.c[k] = tap.second;
    }
    terms.push_back(t);
  };
  auto unit = [](int i, int s) {
    std::array<int, 3> e{0, 0, 0};
    e[i] = s;
    return e;
  };
  auto sum = [](std::array<int, 3> p, std::array<int, 3> q) {
    return std::array<int, 3>{p[0] + q[0], p[1] + q[1], p[2] + q[2]};
  };
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    if (a.kind == reg::Kind::BENDING) {
      add(a.wt[i], {{unit(i, 1), 1.0}, {unit(i, 0), -2.0}, {unit(i, -1), 1.0}});
    } else {
      add(a.wt[i], {{unit(i, 1), 1.0}, {unit(i, -1), -1.0}});
    }
  }
  if (a.kind != reg::Kind::BENDING) return terms;
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    for (int j = i + 1; j < 3; ++j) {
      add(a.wx[RegArgs::pair(i, j)],
          {{sum(unit(i, 1), unit(j, 1)), 1.0}, {sum(unit(i, 1), unit(j, -1)), -1.0},
           {sum(unit(i, -1), unit(j, 1)), -1.0}, {sum(unit(i, -1), unit(j, -1)), 1.0}});
    }
  }
  return terms;
}

// Σ_{w = 1}^{W − 2} S(centre row r, w)².
template <typename T, int N>
double row_square_sum(const Term& t, const T* r, int64_t W) {
  const T* p[N];
  T c[N];
  for (int k = 0; k < N; ++k) {
    p[k] = r + t.off[k];
    c[k] = T(t.c[k]);
  }
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t w = 1; w < W - 1; ++w) {
    T v = T(0);
    for (int k = 0; k < N; ++k) v += c[k] * p[k][w];
    s += double(v * v);
  }
  return s;
}

// out[w] = S(centre row r, w) for w in [1, W − 2].
template <typename T, int N>
void row_stencil(const Term& t, const T* r, T* out, int64_t W) {
  const T* p[N];
  T c[N];
  for (int k = 0; k < N; ++k) {
    p[k] = r + t.off[k];
    c[k] = T(t.c[k]);
  }
#pragma omp simd
  for (int64_t w = 1; w < W - 1; ++w) {
    T v = T(0);
    for (int k = 0; k < N; ++k) v += c[k] * p[k][w];
    out[w] = v;
  }
}

// gr[w] (= or +=) Σ_j c[j] q[j][w] over w in [0, W).
template <typename T, int N>
void row_combine(const T* const* q, const T* c, bool first, T* gr, int64_t W) {
  const T* p[N];
  T cc[N];
  for (int j = 0; j < N; ++j) {
    p[j] = q[j];
    cc[j] = c[j];
  }
  if (first) {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      T v = T(0);
      for (int j = 0; j < N; ++j) v += cc[j] * p[j][w];
      gr[w] = v;
    }
  } else {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      T v = T(0);
      for (int j = 0; j < N; ++j) v += cc[j] * p[j][w];
      gr[w] += v;
    }
  }
}

template <typename T>
double stencil_plane_energy(const RegArgs& a, const std::vector<Term>& terms, const T* base,
                            int64_t d) {
  if (a.ndim == 3 && (d < 1 || d > a.D - 2)) return 0.0;
  double s = 0.0;
  for (int64_t h = 1; h + 1 < a.H; ++h) {
    const T* r = base + h * a.W;
    for (const Term& t : terms) {
      const double q = t.n == 2   ? row_square_sum<T, 2>(t, r, a.W)
                       : t.n == 3 ? row_square_sum<T, 3>(t, r, a.W)
                                  : row_square_sum<T, 4>(t, r, a.W);
      s += t.w * q;
    }
  }
  return s;
}

// The gradient of bending / diffusion, ∂E/∂u(x) = Σ_t 2 w_t Σ_k c_k F_t(x − o_k), from the
// term planes F_t = S_t u on interior voxels, 0 elsewhere (and outside the volume). Each
// thread walks its contiguous run of planes keeping F of planes d − 1, d, d + 1 in a ring
// of three slots (plane e in slot e mod 3), padded by one voxel on every side so the
// gather needs no bounds: each F plane is computed once per thread run and every gradient
// row is one pass per four taps (3D bending: 21 loads per voxel for F, 21 for the gather).
template <typename T>
void stencil_backward(const RegArgs& a, const std::vector<Term>& terms, const T* u,
                      const T* scale, T* grad) {
  const int64_t D = a.D, H = a.H, W = a.W, hw = H * W;
  const int64_t PW = W + 2, pplane = (H + 2) * PW;
  const int64_t nt = int64_t(terms.size()), planes = a.B * a.C * D, per_item = a.C * D;
  int ntaps = 0;
  for (const Term& t : terms) ntaps += t.n;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<T> ring(static_cast<size_t>(3 * nt * pplane));
    int64_t held[3] = {-1, -1, -1};  // the global plane index each slot holds
    bool zero[3] = {true, true, true};
    std::vector<const T*> q(static_cast<size_t>(ntaps));
    std::vector<T> c(static_cast<size_t>(ntaps));

    // F of global plane gp (depth e) into slot: 0 off the interior.
    auto fill = [&](int64_t gp, int64_t e, int slot) {
      held[slot] = gp;
      zero[slot] = a.ndim == 3 && (e < 1 || e > D - 2);
      if (zero[slot]) return;  // never read: the gather skips zero planes
      const T* base = u + gp * hw;
      for (int64_t ti = 0; ti < nt; ++ti) {
        const Term& t = terms[size_t(ti)];
        T* f = ring.data() + (slot * nt + ti) * pplane;
        std::fill(f, f + 2 * PW, T(0));                       // padded rows 0, 1
        std::fill(f + H * PW, f + (H + 2) * PW, T(0));        // padded rows H, H + 1
        for (int64_t h = 1; h + 1 < H; ++h) {
          T* row = f + (h + 1) * PW + 1;  // row[w] = F(h, w), w in [−1, W]
          row[-1] = row[0] = row[W - 1] = row[W] = T(0);
          if (t.n == 2) {
            row_stencil<T, 2>(t, base + h * W, row, W);
          } else if (t.n == 3) {
            row_stencil<T, 3>(t, base + h * W, row, W);
          } else {
            row_stencil<T, 4>(t, base + h * W, row, W);
          }
        }
      }
    };

#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t d = p % D, vol0 = p - d;  // vol0: global index of the volume's plane 0
      for (int64_t e = d - 1; e <= d + 1; ++e) {
        if (e < 0 || e > D - 1) continue;
        const int slot = int(e % 3);
        if (held[slot] != vol0 + e) fill(vol0 + e, e, slot);
      }
      const double sc = double(scale[p / per_item]);
      T* g = grad + p * hw;
      for (int64_t h = 0; h < H; ++h) {
        int n = 0;
        for (int64_t ti = 0; ti < nt; ++ti) {
          const Term& t = terms[size_t(ti)];
          for (int k = 0; k < t.n; ++k) {
            const int64_t e = d - t.od[k];  // the centre x − o_k lies in plane e
            if (e < 0 || e > D - 1 || zero[e % 3]) continue;
            const T* f = ring.data() + ((e % 3) * nt + ti) * pplane;
            q[size_t(n)] = f + (h - t.oh[k] + 1) * PW + 1 - t.ow[k];
            c[size_t(n)] = T(2.0 * t.w * t.c[k] * sc);
            ++n;
          }
        }
        T* gr = g + h * W;
        if (n == 0) std::fill(gr, gr + W, T(0));
        for (int j = 0; j < n; j += 4) {
          const int m = std::min(4, n - j);
          const bool first = j == 0;
          if (m == 4) {
            row_combine<T, 4>(q.data() + j, c.data() + j, first, gr, W);
          } else if (m == 3) {
            row_combine<T, 3>(q.data() + j, c.data() + j, first, gr, W);
          } else if (m == 2) {
            row_combine<T, 2>(q.data() + j, c.data() + j, first, gr, W);
          } else {
            row_combine<T, 1>(q.data() + j, c.data() + j, first, gr, W);
          }
        }
      }
    }
  }
}

// Energy of plane p (item b, channel c, depth d), summed in double.
template <typename T>
double plane_energy(const RegArgs& a, const T* base, int64_t d) {
  const int64_t W = a.W;
  double s = 0.0;
  if (a.kind == reg::Kind::HARMONIC) {
    if (a.ndim == 3 && (d < 1 || d > a.D - 2)) return 0.0;
    const int nact = a.ndim == 3 ? 3 : 2;
    const T centre = T(2 * nact), axial = a.ndim == 3 ? T(1) : T(0);
    const int64_t hw = a.ndim == 3 ? a.H * W : 0;  // 2D: the D terms read the row itself
    for (int64_t h = 1; h + 1 < a.H; ++h) {
      const T* r = base + h * W;
      double rs = 0.0;
#pragma omp simd reduction(+ : rs)
      for (int64_t w = 1; w < W - 1; ++w) {
        const T l = r[w - 1] + r[w + 1] + r[w - W] + r[w + W] +
                    axial * (r[w - hw] + r[w + hw]) - centre * r[w];
        rs += double(l * l);
      }
      s += rs;
    }
    return s;
  }
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    const RowNeighbours<T> n = neighbours(a, r, d, h, r);
    double sw = 0.0, sh = 0.0, sd = 0.0;
#pragma omp simd reduction(+ : sw)
    for (int64_t w = 0; w < W - 1; ++w) {
      const T t = r[w + 1] - r[w];
      sw += double(t * t);
    }
#pragma omp simd reduction(+ : sh, sd)
    for (int64_t w = 0; w < W; ++w) {
      const T th = n.hp[w] - r[w], td = n.dp[w] - r[w];
      sh += double(th * th);
      sd += double(td * td);
    }
    s += a.wt[2] * sw + a.wt[1] * sh + a.wt[0] * sd;
  }
  return s;
}

template <typename T>
void forward_impl(const RegArgs& a, const T* u, T* out) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W;
  std::vector<double> partial(static_cast<size_t>(planes));
  if (a.kind == reg::Kind::BENDING || a.kind == reg::Kind::DIFFUSION) {
    const std::vector<Term> terms = stencil_terms(a);
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t p = 0; p < planes; ++p) {
      partial[p] = stencil_plane_energy<T>(a, terms, u + p * plane, p % a.D);
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t p = 0; p < planes; ++p) partial[p] = plane_energy<T>(a, u + p * plane, p % a.D);
  }
  const int64_t per_item = a.C * a.D;
  for (int64_t b = 0; b < a.B; ++b) {
    double s = 0.0;
    for (int64_t p = 0; p < per_item; ++p) s += partial[b * per_item + p];
    out[b] = T(s);
  }
}

// grad_l2: ∂E/∂u = 2 Σ_i wt_i ((u − u_{−i}) − (u_{+i} − u)), terms outside the volume 0.
template <typename T>
void grad_l2_backward_plane(const RegArgs& a, const T* base, T sc, T* g, int64_t d) {
  const int64_t W = a.W;
  const T w0 = T(2 * a.wt[0]) * sc, w1 = T(2 * a.wt[1]) * sc, w2 = T(2 * a.wt[2]) * sc;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    T* gr = g + h * W;
    const RowNeighbours<T> n = neighbours(a, r, d, h, r);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      const T u0 = r[w];
      gr[w] = w2 * (T(2) * u0 - r[w - 1] - r[w + 1]) + w1 * (T(2) * u0 - n.hm[w] - n.hp[w]) +
              w0 * (T(2) * u0 - n.dm[w] - n.dp[w]);
    }
    const int64_t ends[2] = {0, W - 1};
    for (int e = 0; e < (W > 1 ? 2 : 1); ++e) {
      const int64_t w = ends[e];
      const int64_t x[3] = {d, h, w};
      gr[w] = sc * reg::voxel_grad<T>(a, r + w, x);
    }
  }
}

// harmonic: ∂E/∂u = 2 (∇² L)(x), L the Laplacian of u on interior voxels, 0 elsewhere
// (and outside the volume). L is computed once into `lap` (the whole tensor).
template <typename T>
void harmonic_laplacian_plane(const RegArgs& a, const T* base, T* lap, int64_t d) {
  const int64_t W = a.W, plane = a.H * W;
  const bool plane_in = a.ndim != 3 || (d >= 1 && d <= a.D - 2);
  const int nact = a.ndim == 3 ? 3 : 2;
  const T centre = T(2 * nact), axial = a.ndim == 3 ? T(1) : T(0);
  const int64_t hw = a.ndim == 3 ? plane : 0;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    T* l = lap + h * W;
    if (!plane_in || h < 1 || h > a.H - 2 || W < 3) {
      std::fill(l, l + W, T(0));
      continue;
    }
    l[0] = T(0);
    l[W - 1] = T(0);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      l[w] = r[w - 1] + r[w + 1] + r[w - W] + r[w + W] + axial * (r[w - hw] + r[w + hw]) -
             centre * r[w];
    }
  }
}

template <typename T>
void harmonic_backward_plane(const RegArgs& a, const T* lbase, const T* zeros, T sc, T* g,
                             int64_t d) {
  const int64_t W = a.W;
  const T centre = T(2 * (a.ndim == 3 ? 3 : 2)), two_sc = T(2) * sc;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* l = lbase + h * W;
    T* gr = g + h * W;
    const RowNeighbours<T> n = neighbours(a, l, d, h, zeros);
    // L beyond the row's ends is 0 too.
    auto at = [&](int64_t w) {
      const T left = w >= 1 ? l[w - 1] : T(0), right = w + 1 < W ? l[w + 1] : T(0);
      return two_sc * (left + right + n.hm[w] + n.hp[w] + n.dm[w] + n.dp[w] - centre * l[w]);
    };
    gr[0] = at(0);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      gr[w] = two_sc * (l[w - 1] + l[w + 1] + n.hm[w] + n.hp[w] + n.dm[w] + n.dp[w] -
                        centre * l[w]);
    }
    if (W > 1) gr[W - 1] = at(W - 1);
  }
}

template <typename T>
void backward_impl(const RegArgs& a, const T* u, const T* scale, T* grad) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W, per_item = a.C * a.D;
  if (a.kind == reg::Kind::BENDING || a.kind == reg::Kind::DIFFUSION) {
    stencil_backward<T>(a, stencil_terms(a), u, scale, grad);
    return;
  }
  if (a.kind == reg::Kind::HARMONIC) {
    // Every entry is written by the first loop: no zero-initialisation.
    const std::unique_ptr<T[]> lap(new T[static_cast<size_t>(planes * plane)]);
    const std::vector<T> zeros(static_cast<size_t>(a.W), T(0));
#pragma omp parallel num_threads(a.num_threads)
    {
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; ++p) {
        harmonic_laplacian_plane<T>(a, u + p * plane, lap.get() + p * plane, p % a.D);
      }
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; ++p) {
        harmonic_backward_plane<T>(a, lap.get() + p * plane, zeros.data(), scale[p / per_item],
                                   grad + p * plane, p % a.D);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t p = 0; p < planes; ++p) {
    grad_l2_backward_plane<T>(a, u + p * plane, scale[p / per_item], grad + p * plane, p % a.D);
  }
}

}  // namespace

void regularisers_forward(const RegArgs& a, uintptr_t u, uintptr_t out) {
  dispatch_real(int(a.dtype), "regulariser cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    forward_impl<T>(a, reinterpret_cast<const T*>(u), reinterpret_cast<T*>(out));
  });
}

void regularisers_backward(const RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad) {
  dispatch_real(int(a.dtype), "regulariser cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    backward_impl<T>(a, reinterpret_cast<const T*>(u), reinterpret_cast<const T*>(scale),
                     reinterpret_cast<T*>(grad));
  });
}

}  // namespace cpu

namespace {
reg::RegArgs reg_args(int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size,
                      std::vector<double> wt, int num_threads) {
  if (size.size() != 2 && size.size() != 3) throw std::invalid_argument("regularisers: size must have 2 or 3 entries");
  if (kind < 0 || kind > 3) throw std::invalid_argument("regularisers: unknown kind");
  // bending: ndim axis weights, then one per axis pair (i < j, in order); else one per axis.
  const size_t nw = kind == int(reg::Kind::BENDING) ? (size.size() == 3 ? 6 : 3) : size.size();
  if (wt.size() != nw) throw std::invalid_argument("regularisers: wrong number of weights");
  reg::RegArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.kind = static_cast<reg::Kind>(kind);
  a.ndim = static_cast<int>(size.size());
  a.B = B;
  a.C = C;
  const int off = a.ndim == 3 ? 0 : 1;  // 2D: axes H, W
  a.D = a.ndim == 3 ? size[0] : 1;
  a.H = size[1 - off];
  a.W = size[2 - off];
  for (size_t i = 0; i < size.size(); ++i) a.wt[i + off] = wt[i];
  if (a.kind == reg::Kind::BENDING) {
    size_t k = size.size();
    for (int i = off; i < 3; ++i) {
      for (int j = i + 1; j < 3; ++j) a.wx[reg::RegArgs::pair(i, j)] = wt[k++];
    }
  }
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}
}  // namespace

void register_regularisers(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "regularisers_forward_cpu",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         int num_threads, uintptr_t u, uintptr_t out) {
        cpu::regularisers_forward(reg_args(dtype, kind, B, C, size, wt, num_threads), u, out);
      },
      release);
  m.def(
      "regularisers_backward_cpu",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         int num_threads, uintptr_t u, uintptr_t scale, uintptr_t grad) {
        cpu::regularisers_backward(reg_args(dtype, kind, B, C, size, wt, num_threads), u, scale, grad);
      },
      release);
  m.def(
      "regularisers_forward_cuda",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         uintptr_t u, uintptr_t partials, uintptr_t stream) {
        cuda::regularisers_forward(reg_args(dtype, kind, B, C, size, wt, 1), u, partials, stream);
      },
      release);
  m.def(
      "regularisers_backward_cuda",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         uintptr_t u, uintptr_t scale, uintptr_t grad, uintptr_t scratch, uintptr_t stream) {
        cuda::regularisers_backward(reg_args(dtype, kind, B, C, size, wt, 1), u, scale, grad, scratch,
                                    stream);
      },
      release);
}

}  // namespace mrus
