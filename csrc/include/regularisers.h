// Per-voxel math of the smoothness regularisers of a displacement field u [B, C, *S],
// shared by the CPU and CUDA kernels.
//
// grad_l2:  E = Σ_i wt_i Σ_x [x_i <= n_i − 2] (u(x + e_i) − u(x))²     (forward differences)
//           with wt_i = 1 / (h_i² · ndim · count_i), count_i the number of differences
//           along axis i in the whole tensor: E is the mean over each axis, averaged.
// harmonic: E = Σ_{x interior} (∇²u(x))², ∇² the 5-point (2D) / 7-point (3D) Laplacian.
// Kernels write per-item sums; the gradients below are ∂E/∂u(x) for one item.
#pragma once

#include <cstdint>

#include "common.h"

namespace mrus {
namespace reg {

enum class Kind : int { GRAD_L2 = 0, HARMONIC = 1 };

// 2D fields have D = 1 and axis 0 inactive. Volumes are [B, C, D, H, W], contiguous.
struct RegArgs {
  DType dtype = DType::F32;
  Kind kind = Kind::GRAD_L2;
  int ndim = 3;
  int64_t B = 0, C = 0, D = 1, H = 0, W = 0;
  double wt[3] = {0, 0, 0};  // grad_l2 axis weights (axis order D, H, W)
  int num_threads = 1;
  MRUS_HD int64_t vol() const { return D * H * W; }
  MRUS_HD int64_t size(int i) const { return i == 0 ? D : (i == 1 ? H : W); }
  MRUS_HD int64_t stride(int i) const { return i == 0 ? H * W : (i == 1 ? W : 1); }
  MRUS_HD bool active(int i) const { return i > 0 || ndim == 3; }
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

template <typename T>
MRUS_HD T voxel_energy(const RegArgs& a, const T* u, const int64_t* x) {
  if (a.kind == Kind::HARMONIC) {
    if (!interior<T>(a, x)) return T(0);
    const T l = laplacian(a, u);
    return l * l;
  }
  T e = T(0);
  for (int i = 0; i < 3; ++i) {
    if (!a.active(i) || x[i] > a.size(i) - 2) continue;
    const T d = u[a.stride(i)] - u[0];
    e += T(a.wt[i]) * d * d;
  }
  return e;
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
MRUS_HD T voxel_grad(const RegArgs& a, const T* u, const int64_t* x) {
  if (a.kind == Kind::HARMONIC) {
    return harmonic_adjoint<T>(a, x, [&](int64_t off) { return laplacian(a, u + off); });
  }
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
