// Per-voxel math of the smoothness regularisers of a displacement field u [B, C, *S],
// shared by the CPU and CUDA kernels.
//
// grad_l2:  E = Σ_i wt_i Σ_x [x_i <= n_i − 2] (u(x + e_i) − u(x))²     (forward differences)
//           with wt_i = 1 / (h_i² · ndim · count_i), count_i the number of differences
//           along axis i in the whole tensor: E is the mean over each axis, averaged.
// harmonic: E = Σ_{x interior} (∇²u(x))², ∇² the 5-point (2D) / 7-point (3D) Laplacian.
// bending:  E = Σ_{x interior} Σ_i wt_i P_i(x)² + Σ_{i<j} wx_{ij} M_ij(x)² (MONAI's bending
//           energy), P_i = u(x + e_i) − 2u(x) + u(x − e_i), M_ij = u(x + e_i + e_j) −
//           u(x + e_i − e_j) − u(x − e_i + e_j) + u(x − e_i − e_j); wt_i = 1/h_i⁴,
//           wx_ij = 2/(16 h_i² h_j²) (the spacing and MONAI's factors folded in).
// diffusion: E = Σ_{x interior} Σ_i wt_i (u(x + e_i) − u(x − e_i))², wt_i = 1/(4 h_i²).
// "interior": 1 <= x_i <= n_i − 2 on every active axis. Kernels write per-item sums; the
// gradients below are ∂E/∂u(x) for one item.
#pragma once

#include <cstdint>

#include "common.h"

namespace mrus {
namespace reg {

enum class Kind : int { GRAD_L2 = 0, HARMONIC = 1, BENDING = 2, DIFFUSION = 3 };

// 2D fields have D = 1 and axis 0 inactive. Volumes are [B, C, D, H, W], contiguous.
struct RegArgs {
  DType dtype = DType::F32;
  Kind kind = Kind::GRAD_L2;
  int ndim = 3;
  int64_t B = 0, C = 0, D = 1, H = 0, W = 0;
  double wt[3] = {0, 0, 0};  // per-axis weights of grad_l2 / bending / diffusion (D, H, W)
  double wx[3] = {0, 0, 0};  // bending mixed-term weights, pair (i, j) at pair(i, j)
  int num_threads = 1;
  MRUS_HD int64_t vol() const { return D * H * W; }
  MRUS_HD int64_t size(int i) const { return i == 0 ? D : (i == 1 ? H : W); }
  MRUS_HD int64_t stride(int i) const { return i == 0 ? H * W : (i == 1 ? W : 1); }
  MRUS_HD bool active(int i) const { return i > 0 || ndim == 3; }
  // Index of the axis pair i < j in wx: the axis it leaves out (HW 0, DW 1, DH 2).
  MRUS_HD static int pair(int i, int j) { return 3 - i - j; }
};

// The CUDA kernels handle REG_CUDA_BLOCK voxels of one item per block; the forward writes
// one partial per block: [B, ceil(C D H W / REG_CUDA_BLOCK)], summed in fixed order.
constexpr int REG_CUDA_BLOCK = 256;

// u points at voxel x = (x0, x1, x2) of one volume.
template <typename T>
MRUS_HD bool interior(const RegArgs& a, const int64_t* x) {
  for (int i = 0; i < 3; ++i) {
    if (a.active(i) && (x[i] < 1 || x[i] > a.size(i) - 2)) return false;
  }
  return true;
}

template <typename T>
MRUS_HD T laplacian(const RegArgs& a, const T* u) {
  T s = T(0);
  int nact = 0;
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    const int64_t st = a.stride(i);
    s += u[st] + u[-st];
    ++nact;
  }
  return s - T(2 * nact) * u[0];
}

// Raw stencils of bending and diffusion at the voxel u points at (no weights).
template <typename T>
MRUS_HD T second_diff(const RegArgs& a, const T* u, int i) {
  const int64_t s = a.stride(i);
  return u[s] - T(2) * u[0] + u[-s];
}

template <typename T>
MRUS_HD T cross_diff(const RegArgs& a, const T* u, int i, int j) {
  const int64_t si = a.stride(i), sj = a.stride(j);
  return (u[si + sj] - u[si - sj]) - (u[sj - si] - u[-si - sj]);
}

template <typename T>
MRUS_HD T central_diff(const RegArgs& a, const T* u, int i) {
  const int64_t s = a.stride(i);
  return u[s] - u[-s];
}

// The weighted terms of bending / diffusion at an interior voxel.
template <typename T, bool BENDING>
MRUS_HD T stencil_energy(const RegArgs& a, const T* u) {
  T e = T(0);
  MRUS_UNROLL
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    const T d = BENDING ? second_diff(a, u, i) : central_diff(a, u, i);
    e += T(a.wt[i]) * d * d;
  }
  if constexpr (BENDING) {
    MRUS_UNROLL
    for (int i = 0; i < 3; ++i) {
      if (!a.active(i)) continue;
      MRUS_UNROLL
      for (int j = i + 1; j < 3; ++j) {
        const T m = cross_diff(a, u, i, j);
        e += T(a.wx[RegArgs::pair(i, j)]) * m * m;
      }
    }
  }
  return e;
}

// ∂E/∂u(x) of bending / diffusion by gathering: E = Σ_t w_t Σ_{y interior} S_t(y)², S_t(y) =
// Σ_k c_k u(y + o_k), so ∂E/∂u(x) = Σ_t 2 w_t Σ_k c_k [x − o_k interior] S_t(x − o_k): each
// stencil recomputed at the interior centres y = x − o_k that reach x (single writer).
template <typename T, bool BENDING>
MRUS_HD T stencil_grad(const RegArgs& a, const T* u, const int64_t* x) {
  int64_t y[3] = {x[0], x[1], x[2]};
  T g = T(0);
  MRUS_UNROLL
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    const int64_t st = a.stride(i);
    T t = T(0);
    MRUS_UNROLL
    for (int s = -1; s <= 1; ++s) {  // centre y = x + s e_i
      if (s == 0 && !BENDING) continue;
      y[i] = x[i] + s;
      if (!interior<T>(a, y)) continue;
      // The coefficient of u(x) = u(y − s e_i) in S(y): P: 1 at ±1, −2 at 0; central: −s.
      if constexpr (BENDING) {
        t += (s == 0 ? T(-2) : T(1)) * second_diff(a, u + s * st, i);
      } else {
        t += T(-s) * central_diff(a, u + s * st, i);
      }
    }
    y[i] = x[i];
    g += T(2 * a.wt[i]) * t;
  }
  if constexpr (BENDING) {
    MRUS_UNROLL
    for (int i = 0; i < 3; ++i) {
      if (!a.active(i)) continue;
      const int64_t si = a.stride(i);
      MRUS_UNROLL
      for (int j = i + 1; j < 3; ++j) {
        const int64_t sj = a.stride(j);
        T t = T(0);
        MRUS_UNROLL
        for (int p = -1; p <= 1; p += 2) {
          MRUS_UNROLL
          for (int q = -1; q <= 1; q += 2) {  // centre y = x + p e_i + q e_j
            y[i] = x[i] + p;
            y[j] = x[j] + q;
            // u(x) sits at offset (−p, −q) from y: coefficient (−p)(−q) = p q.
            if (interior<T>(a, y)) t += T(p * q) * cross_diff(a, u + p * si + q * sj, i, j);
          }
        }
        y[i] = x[i];
        y[j] = x[j];
        g += T(2 * a.wx[RegArgs::pair(i, j)]) * t;
      }
    }
  }
  return g;
}

// Energy of voxel x for one kind (the CUDA kernels are compiled per kind: fewer registers).
template <typename T, Kind K>
MRUS_HD T kind_energy(const RegArgs& a, const T* u, const int64_t* x) {
  if constexpr (K == Kind::BENDING || K == Kind::DIFFUSION) {
    return interior<T>(a, x) ? stencil_energy<T, K == Kind::BENDING>(a, u) : T(0);
  } else if constexpr (K == Kind::HARMONIC) {
    if (!interior<T>(a, x)) return T(0);
    const T l = laplacian(a, u);
    return l * l;
  } else {
    T e = T(0);
    for (int i = 0; i < 3; ++i) {
      if (!a.active(i) || x[i] > a.size(i) - 2) continue;
      const T d = u[a.stride(i)] - u[0];
      e += T(a.wt[i]) * d * d;
    }
    return e;
  }
}

template <typename T>
MRUS_HD T voxel_energy(const RegArgs& a, const T* u, const int64_t* x) {
  switch (a.kind) {
    case Kind::HARMONIC: return kind_energy<T, Kind::HARMONIC>(a, u, x);
    case Kind::BENDING: return kind_energy<T, Kind::BENDING>(a, u, x);
    case Kind::DIFFUSION: return kind_energy<T, Kind::DIFFUSION>(a, u, x);
    default: return kind_energy<T, Kind::GRAD_L2>(a, u, x);
  }
}

// ∂/∂u(x) Σ_y L(y)² = 2 Σ_y L(y) ∂L(y)/∂u(x): y = x (weight −2 ndim) and its interior
// neighbours. lap_at(off) is L at the voxel `off` elements from x: recomputed from u on the
// CPU (voxel_grad), read from the pass-1 scratch on the GPU (harmonic_grad_from_laplacian).
template <typename T, typename LapAt>
MRUS_HD T harmonic_adjoint(const RegArgs& a, const int64_t* x, LapAt lap_at) {
  int nact = 0;
  for (int i = 0; i < 3; ++i) nact += a.active(i) ? 1 : 0;
  T g = interior<T>(a, x) ? -T(2 * nact) * lap_at(0) : T(0);
  int64_t y[3] = {x[0], x[1], x[2]};
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    const int64_t st = a.stride(i);
    for (int s = -1; s <= 1; s += 2) {
      y[i] = x[i] + s;
      if (interior<T>(a, y)) g += lap_at(s * st);
    }
    y[i] = x[i];
  }
  return T(2) * g;
}

template <typename T>
MRUS_HD T grad_l2_grad(const RegArgs& a, const T* u, const int64_t* x) {
  T g = T(0);
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i)) continue;
    const int64_t st = a.stride(i);
    T t = T(0);
    if (x[i] >= 1) t += u[0] - u[-st];
    if (x[i] <= a.size(i) - 2) t -= u[st] - u[0];
    g += T(2 * a.wt[i]) * t;
  }
  return g;
}

template <typename T>
MRUS_HD T voxel_grad(const RegArgs& a, const T* u, const int64_t* x) {
  switch (a.kind) {
    case Kind::BENDING: return stencil_grad<T, true>(a, u, x);
    case Kind::DIFFUSION: return stencil_grad<T, false>(a, u, x);
    case Kind::HARMONIC:
      return harmonic_adjoint<T>(a, x, [&](int64_t off) { return laplacian(a, u + off); });
    default: return grad_l2_grad(a, u, x);
  }
}

// The GPU harmonic backward in two passes over a scratch L of u's shape: L(x) = ∇²u(x) on
// interior voxels, 0 elsewhere (harmonic_laplacian), then the adjoint stencil gathers from L
// (harmonic_grad_from_laplacian): 14 loads per voxel in 3D instead of the 49 of voxel_grad,
// which recomputes the Laplacian at each neighbour. Both add the same terms in the same order.
template <typename T>
MRUS_HD T harmonic_laplacian(const RegArgs& a, const T* u, const int64_t* x) {
  return interior<T>(a, x) ? laplacian(a, u) : T(0);
}

// ∂E/∂u(x) = 2 Σ_y L(y) ∂L(y)/∂u(x), L pointing at voxel x of the pass-1 scratch.
template <typename T>
MRUS_HD T harmonic_grad_from_laplacian(const RegArgs& a, const T* L, const int64_t* x) {
  return harmonic_adjoint<T>(a, x, [&](int64_t off) { return L[off]; });
}

}  // namespace reg
}  // namespace mrus
