// GroupNorm (torch semantics: biased variance, eps inside the root, per-channel affine) and its gradient as MindSpore
// AOT custom ops on CPU. MindSpore 2.10's CPU GroupNorm and GroupNormGrad took 18x torch's time (forward and
// gradient on a VAE training shape, benchmarks/README); these run one (sample, group) pair per task on threadpool.h.
//
// Float32, contiguous (B, C, *spatial). The last input is a float32 tensor of shape (G,) whose first value is eps:
// its shape carries the group count to the kernel and to MindSpore's shape inference.
// Forward: x, weight (C), bias (C), conf -> y, mean (B, G), rstd (B, G).
// Backward: dy, x, weight, mean, rstd, conf -> dx, dweight, dbias.
// Sums run in float lanes over short blocks and in double across blocks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "threadpool.h"

namespace {

constexpr int64_t kBlock = 4096;  // elements summed in float before the partial sum joins the double total

// sum of f(i) for i in [0, n)
template <typename F>
double sum(int64_t n, F f) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float lanes[16] = {};
    int64_t i = start;
    for (; i + 16 <= end; i += 16)
      for (int k = 0; k < 16; ++k) lanes[k] += f(i + k);
    float part = 0.0f;
    for (int k = 0; k < 16; ++k) part += lanes[k];
    for (; i < end; ++i) part += f(i);
    total += part;
  }
  return total;
}

struct Shape {
  int64_t batch, channels, spatial, groups;
  int64_t per_group() const { return channels / groups; }
};

bool shape_of(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int conf, Shape &s) {
  if (nparam != expected || ndims[0] < 2 || ndims[conf] != 1) return false;
  for (int i = 0; i < nparam; ++i)
    if (std::string(dtypes[i]) != "float32") return false;
  s.batch = shapes[0][0], s.channels = shapes[0][1], s.spatial = 1, s.groups = shapes[conf][0];
  for (int d = 2; d < ndims[0]; ++d) s.spatial *= shapes[0][d];
  return s.groups > 0 && s.channels % s.groups == 0;
}

}  // namespace

extern "C" {

int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  Shape s;
  if (!shape_of(nparam, 7, ndims, shapes, dtypes, 3, s)) return 1;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const double eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]), *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  const int64_t cg = s.per_group(), n = cg * s.spatial;
  threadpool().parallel_for(static_cast<int>(s.batch * s.groups), [&](int task, int) {
    const int64_t first = static_cast<int64_t>(task) * n;  // (b, g) groups are contiguous: b * C * HW + g * cg * HW
    const float *xs = x + first;
    const double m = sum(n, [&](int64_t i) { return xs[i]; }) / n;
    const float mf = static_cast<float>(m);
    const double var = sum(n, [&](int64_t i) { return (xs[i] - mf) * (xs[i] - mf); }) / n;
    const double r = 1.0 / std::sqrt(var + eps);
    mean[task] = mf, rstd[task] = static_cast<float>(r);
    const int64_t c0 = (task % s.groups) * cg;
    for (int64_t c = 0; c < cg; ++c) {
      const float scale = static_cast<float>(r * w[c0 + c]), shift = static_cast<float>(b[c0 + c] - m * r * w[c0 + c]);
      const float *xc = xs + c * s.spatial;
      float *yc = y + first + c * s.spatial;
      for (int64_t i = 0; i < s.spatial; ++i) yc[i] = xc[i] * scale + shift;
    }
  });
  return 0;
}

int GroupNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  Shape s;
  if (!shape_of(nparam, 9, ndims, shapes, dtypes, 5, s)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]), *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[6]), *dw = static_cast<float *>(params[7]);
  float *db = static_cast<float *>(params[8]);
  const int64_t cg = s.per_group(), n = cg * s.spatial;
  // per (sample, channel): sum of dy and of dy * xhat; the weight and bias gradients sum them over the batch
  std::vector<double> dy_sum(s.batch * s.channels), dy_xhat_sum(s.batch * s.channels);
  threadpool().parallel_for(static_cast<int>(s.batch * s.groups), [&](int task, int) {
    const int64_t first = static_cast<int64_t>(task) * n, c0 = (task % s.groups) * cg;
    const int64_t row = (task / s.groups) * s.channels + c0;  // index of (b, c0) in the (B, C) sums
    const float m = mean[task], r = rstd[task];
    double s1 = 0.0, s2 = 0.0;  // sums over the group of w * dy and w * dy * xhat
    for (int64_t c = 0; c < cg; ++c) {
      const float *dyc = dy + first + c * s.spatial, *xc = x + first + c * s.spatial;
      dy_sum[row + c] = sum(s.spatial, [&](int64_t i) { return dyc[i]; });
      dy_xhat_sum[row + c] = sum(s.spatial, [&](int64_t i) { return dyc[i] * ((xc[i] - m) * r); });
      s1 += w[c0 + c] * dy_sum[row + c], s2 += w[c0 + c] * dy_xhat_sum[row + c];
    }
    const float a = static_cast<float>(s1 / n), bb = static_cast<float>(s2 / n);
    for (int64_t c = 0; c < cg; ++c) {
      const float *dyc = dy + first + c * s.spatial, *xc = x + first + c * s.spatial;
      float *dxc = dx + first + c * s.spatial;
      const float wc = w[c0 + c];
      for (int64_t i = 0; i < s.spatial; ++i) dxc[i] = r * (dyc[i] * wc - a - (xc[i] - m) * r * bb);
    }
  });
  for (int64_t c = 0; c < s.channels; ++c) {
    double gw = 0.0, gb = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) gw += dy_xhat_sum[b * s.channels + c], gb += dy_sum[b * s.channels + c];
    dw[c] = static_cast<float>(gw), db[c] = static_cast<float>(gb);
  }
  return 0;
}
}
