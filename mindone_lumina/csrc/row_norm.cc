// The normalisation of RMSNorm and LayerNorm over the last axis, and its gradient, as MindSpore AOT custom ops on CPU.
// The portable path (backend.py) builds each norm from Square, two row-mean matmuls, Add, Rsqrt and Mul kernels, and
// twice as many in the backward; a small model's training step is mostly such kernels (benchmarks/README). Here each
// row is one pass forward and one backward, rows spread over threadpool.h (rows.h). The affine weight and bias stay
// outside.
//
// Float32, contiguous, any rank >= 1; rows are the last axis. The last input is a float32 (1,) tensor holding eps.
// Forward: x, conf -> y, rstd (rows). RMS: y = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
//          Layer: y = (x - mean(x)) * rstd, rstd = 1 / sqrt(mean((x - mean)^2) + eps).
// Backward: dy, y, rstd, conf -> dx. RMS: dx = rstd * (dy - y * mean(dy * y)).
//           Layer: dx = rstd * (dy - mean(dy) - y * mean(dy * y)).
// Row sums run in 16 double lanes (rows are short: a model width).

#include <cmath>
#include <cstdint>

#include "rows.h"

namespace {

constexpr int kLanes = 16;

// sum over i < n of f(i), in double lanes
template <typename F>
double row_sum(int64_t n, F f) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += f(i + k);
  double total = 0.0;
  for (; i < n; ++i) total += f(i);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

int forward(bool centred, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t rows, n;
  if (!rows_of(nparam, 4, ndims, shapes, dtypes, rows, n)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const double eps = static_cast<const float *>(params[1])[0];
  float *y = static_cast<float *>(params[2]), *rstd = static_cast<float *>(params[3]);
  over_rows(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; ++r) {
      const float *xr = x + r * n;
      float *yr = y + r * n;
      const float mean = centred ? static_cast<float>(row_sum(n, [&](int64_t i) { return xr[i]; }) / n) : 0.0f;
      const double square = row_sum(n, [&](int64_t i) { return double(xr[i] - mean) * (xr[i] - mean); }) / n;
      const float s = static_cast<float>(1.0 / std::sqrt(square + eps));
      rstd[r] = s;
      for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * s;
    }
  });
  return 0;
}

int backward(bool centred, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t rows, n;
  if (!rows_of(nparam, 5, ndims, shapes, dtypes, rows, n)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *y = static_cast<const float *>(params[1]);
  const float *rstd = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[4]);
  over_rows(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; ++r) {
      const float *dyr = dy + r * n, *yr = y + r * n;
      float *dxr = dx + r * n;
      const float dy_mean = centred ? static_cast<float>(row_sum(n, [&](int64_t i) { return dyr[i]; }) / n) : 0.0f;
      const float dot = static_cast<float>(row_sum(n, [&](int64_t i) { return double(dyr[i]) * yr[i]; }) / n);
      const float s = rstd[r];
      for (int64_t i = 0; i < n; ++i) dxr[i] = s * (dyr[i] - dy_mean - yr[i] * dot);
    }
  });
  return 0;
}

}  // namespace

extern "C" {

int RmsNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return forward(false, nparam, params, ndims, shapes, dtypes);
}

int RmsNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return backward(false, nparam, params, ndims, shapes, dtypes);
}

int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return forward(true, nparam, params, ndims, shapes, dtypes);
}

int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return backward(true, nparam, params, ndims, shapes, dtypes);
}
}
