// Per-voxel math of the jacobian_det operator, shared by csrc/cpu/jacobian.cpp and
// csrc/cuda/jacobian.cu.
//
// det(x) = det(I + ∇u(x)), the Jacobian determinant of the map x + u(x), with u [B, ndim, *S]
// (component i along spatial axis i). d u_i / d x_j by finite differences along axis j:
// central inside, (u[k + 1] - u[k - 1]) / 2; one-sided at the two borders, u[1] - u[0] and
// u[n - 1] - u[n - 2]; 0 along an axis of size 1; each divided by the spacing h_j.
//
// The backward is the adjoint of that stencil written as a gather: voxel y collects
// g(x) * cof_ij(x) * c(x, y) / h_j from the voxels x whose differences read u_i(y) (y itself
// and its two neighbours along each axis), so every gradient element has a single writer.
// cof = d det / d J (the cofactor matrix): backward_voxel recomputes it at each neighbour
// (the CPU loops: no scratch); the GPU kernels store P_ij = g · cof_ij / h_j once per voxel
// (weighted_cofactors_voxel) and gather from P (adjoint_voxel): ~27 loads per voxel in 3D
// instead of the ~126 of the recomputing gather.
#pragma once

#include "common.h"

namespace mrus {
namespace jacobian {

// Everything a jacobian kernel needs besides the pointers. u [B, ndim, *size] and
// det / grad_det [B, *size] are contiguous.
struct JacobianArgs {
  int dtype = 0;  // DType
  int ndim = 3;
  int64_t B = 1;
  int64_t size[3] = {1, 1, 1};
  double inv_h[3] = {1.0, 1.0, 1.0};  // 1 / spacing per axis
  int num_threads = 1;  // CPU only

  MRUS_HD int64_t n() const {
    int64_t v = 1;
    for (int i = 0; i < ndim; ++i) v *= size[i];
    return v;
  }
};

// Coordinates and axis strides of voxel n inside one [*size] volume.
template <int NDIM>
struct Voxel {
  int64_t x[NDIM];
  int64_t stride[NDIM];
};

template <int NDIM>
MRUS_HD Voxel<NDIM> voxel(const JacobianArgs& a, int64_t n) {
  Voxel<NDIM> v;
  unravel<NDIM>(n, a.size, a.n(), v.x);
  int64_t st = 1;
MRUS_UNROLL
  for (int i = NDIM - 1; i >= 0; --i) {
    v.stride[i] = st;
    st *= a.size[i];
  }
  return v;
}

// d u / d x_j at flat index n with coordinate xj along axis j (size s, stride st), times
// inv_h: u points at one component of one batch item.
template <typename scalar_t, typename T>
MRUS_HD T difference(const scalar_t* u, int64_t n, int64_t xj, int64_t s, int64_t st, T inv_h) {
  if (s == 1) return T(0);
  const int64_t lo = xj > 0 ? n - st : n;
  const int64_t hi = xj < s - 1 ? n + st : n;
  const T scale = (xj > 0 && xj < s - 1) ? T(0.5) : T(1);
  return (static_cast<T>(u[hi]) - static_cast<T>(u[lo])) * scale * inv_h;
}

// J = I + ∇u at flat voxel n (coordinates x) of the field u (one batch item, [ndim, *size]).
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void jacobian_at(const JacobianArgs& a, const scalar_t* u, int64_t n, const int64_t* x,
                         const int64_t* stride, T J[NDIM][NDIM]) {
  const int64_t nv = a.n();
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) {
MRUS_UNROLL
    for (int j = 0; j < NDIM; ++j) {
      J[i][j] = difference<scalar_t, T>(u + i * nv, n, x[j], a.size[j], stride[j],
                                        static_cast<T>(a.inv_h[j])) +
                (i == j ? T(1) : T(0));
    }
  }
}

template <typename T>
MRUS_HD T det2(const T J[2][2]) {
  return J[0][0] * J[1][1] - J[0][1] * J[1][0];
}

template <typename T>
MRUS_HD T det3(const T J[3][3]) {
  return J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1]) -
         J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0]) +
         J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]);
}

template <int NDIM, typename T>
MRUS_HD T determinant(const T J[NDIM][NDIM]) {
  if constexpr (NDIM == 2) {
    return det2<T>(J);
  } else {
    return det3<T>(J);
  }
}

// Column j of the cofactor matrix: cof[i] = d det / d J[i][j].
template <int NDIM, typename T>
MRUS_HD void cofactor_column(const T J[NDIM][NDIM], int j, T* cof) {
  if constexpr (NDIM == 2) {
    // det = J00 J11 - J01 J10
    if (j == 0) {
      cof[0] = J[1][1];
      cof[1] = -J[0][1];
    } else {
      cof[0] = -J[1][0];
      cof[1] = J[0][0];
    }
  } else {
    // cof[i][j] = J[i+1][j+1] J[i+2][j+2] - J[i+1][j+2] J[i+2][j+1], indices mod 3.
    const int j1 = (j + 1) % 3, j2 = (j + 2) % 3;
MRUS_UNROLL
    for (int i = 0; i < 3; ++i) {
      const int i1 = (i + 1) % 3, i2 = (i + 2) % 3;
      cof[i] = J[i1][j1] * J[i2][j2] - J[i1][j2] * J[i2][j1];
    }
  }
}

// det[b, n] for voxel n of batch item b.
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void forward_voxel(const JacobianArgs& a, const scalar_t* u, scalar_t* det, int64_t b,
                           int64_t n) {
  const int64_t nv = a.n();
  const Voxel<NDIM> v = voxel<NDIM>(a, n);
  T J[NDIM][NDIM];
  jacobian_at<NDIM, scalar_t, T>(a, u + b * NDIM * nv, n, v.x, v.stride, J);
  det[b * nv + n] = static_cast<scalar_t>(determinant<NDIM, T>(J));
}

// The adjoint stencil of jacobian_at's differences at voxel y (coordinates v.x): calls
// term(j, x, xj, w) for every difference along axis j that reads u(y), x being the voxel
// whose Jacobian column j holds it, xj its coordinate along j and w the weight of u(y) in
// it: first y itself at a border (-1 at index 0, +1 at size - 1: one-sided), then the
// neighbours x = y -/+ e_j (+/-1/2 central, +/-1 where x is at a border, one-sided). Axes
// of size 1 have no differences. Shared by the CPU backward (columns recomputed at x) and
// the GPU's second pass (columns read from the scratch P), so both add the same terms in
// the same order.
template <int NDIM, typename T, typename Term>
MRUS_HD void adjoint_stencil(const JacobianArgs& a, const Voxel<NDIM>& v, int64_t y,
                             Term&& term) {
MRUS_UNROLL
  for (int j = 0; j < NDIM; ++j) {
    const int64_t s = a.size[j], m = v.x[j];
    if (s == 1 || (m > 0 && m < s - 1)) continue;
    term(j, y, m, m == 0 ? T(-1) : T(1));
  }
MRUS_UNROLL
  for (int j = 0; j < NDIM; ++j) {
    const int64_t s = a.size[j], m = v.x[j], st = v.stride[j];
    if (s == 1) continue;
MRUS_UNROLL
    for (int side = 0; side < 2; ++side) {
      const int64_t mx = side == 0 ? m - 1 : m + 1;
      if (mx < 0 || mx > s - 1) continue;
      const bool border = mx == 0 || mx == s - 1;
      term(j, side == 0 ? y - st : y + st, mx,
           (side == 0 ? T(1) : T(-1)) * (border ? T(1) : T(0.5)));
    }
  }
}

// grad_u[b, :, y] for voxel y of batch item b, from grad_det [B, *size]: every element of
// grad_u written once.
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void backward_voxel(const JacobianArgs& a, const scalar_t* grad_det, const scalar_t* u,
                            scalar_t* grad_u, int64_t b, int64_t y) {
  const int64_t nv = a.n();
  const scalar_t* ub = u + b * NDIM * nv;
  const scalar_t* gb = grad_det + b * nv;
  const Voxel<NDIM> v = voxel<NDIM>(a, y);
  T acc[NDIM];
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) acc[i] = T(0);
  // Each term: column j of the Jacobian at x (coordinate xj along j), recomputed.
  adjoint_stencil<NDIM, T>(a, v, y, [&](int j, int64_t x, int64_t xj, T w) {
    int64_t xs[NDIM];
MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) xs[i] = v.x[i];
    xs[j] = xj;
    T J[NDIM][NDIM];
    T cof[NDIM];
    jacobian_at<NDIM, scalar_t, T>(a, ub, x, xs, v.stride, J);
    cofactor_column<NDIM, T>(J, j, cof);
    const T c = w * static_cast<T>(a.inv_h[j]) * static_cast<T>(gb[x]);
MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) acc[i] += c * cof[i];
  });
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) grad_u[b * NDIM * nv + i * nv + y] = static_cast<scalar_t>(acc[i]);
}

// GPU backward, pass 1: P[b, i * NDIM + j, n] = (g(n) · inv_h_j) · cof_ij(n) for voxel n of
// batch item b; P [B, NDIM * NDIM, *size] (float). The products are those of backward_voxel,
// so adjoint_voxel adds the same terms in the same order.
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void weighted_cofactors_voxel(const JacobianArgs& a, const scalar_t* grad_det,
                                      const scalar_t* u, T* P, int64_t b, int64_t n) {
  const int64_t nv = a.n();
  const Voxel<NDIM> v = voxel<NDIM>(a, n);
  T J[NDIM][NDIM];
  jacobian_at<NDIM, scalar_t, T>(a, u + b * NDIM * nv, n, v.x, v.stride, J);
  const T g = static_cast<T>(grad_det[b * nv + n]);
  T* Pb = P + b * NDIM * NDIM * nv + n;
  T cof[NDIM];
MRUS_UNROLL
  for (int j = 0; j < NDIM; ++j) {
    const T c = static_cast<T>(a.inv_h[j]) * g;
    cofactor_column<NDIM, T>(J, j, cof);
MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) Pb[(i * NDIM + j) * nv] = c * cof[i];
  }
}

// GPU backward, pass 2: grad_u[b, :, y] gathered from P at y (border weights -1 / +1) and at
// its neighbours y -/+ e_j (+/-1/2 central, +/-1 one-sided), as backward_voxel. Terms with
// weight 0 are skipped, not multiplied (P may be inf or NaN there).
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void adjoint_voxel(const JacobianArgs& a, const T* P, scalar_t* grad_u, int64_t b,
                           int64_t y) {
  const int64_t nv = a.n();
  const Voxel<NDIM> v = voxel<NDIM>(a, y);
  const T* Pb = P + b * NDIM * NDIM * nv;
  T acc[NDIM];
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) acc[i] = T(0);
  adjoint_stencil<NDIM, T>(a, v, y, [&](int j, int64_t x, int64_t, T w) {
MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) acc[i] += w * Pb[(i * NDIM + j) * nv + x];
  });
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) grad_u[b * NDIM * nv + i * nv + y] = static_cast<scalar_t>(acc[i]);
}

}  // namespace jacobian
}  // namespace mrus
