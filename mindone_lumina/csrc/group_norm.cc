// GroupNorm (torch semantics: biased variance, eps inside the root, per-channel affine), optionally followed by SiLU,
// and its gradient as MindSpore AOT custom ops on CPU. MindSpore 2.10's CPU GroupNorm and GroupNormGrad took 18x
// torch's time (forward and gradient on a VAE training shape, benchmarks/README); these run one (sample, group) pair
// per task on threadpool.h. The VAE follows every GroupNorm but the attention's by SiLU, whose Sigmoid, Mul and
// gradient kernels the fused form saves.
//
// Float32, contiguous (B, C, *spatial). The last input is a float32 (G, 2) tensor whose first row is (eps, silu):
// its shape carries the group count to the kernel and to MindSpore's shape inference.
// Forward: x, weight (C), bias (C), conf -> y, mean (B, G), rstd (B, G); y = z or silu(z) = z * sigmoid(z) with
//          z = (x - mean) * rstd * weight + bias.
// Backward: dy, x, weight, mean, rstd, conf -> dx, dweight, dbias (through SiLU by recomputing z).
// Sums run in float lanes over short blocks and in double across blocks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rows.h"

namespace {

constexpr int64_t kBlock = 4096;  // elements summed in float before the partial sum joins the double total

// sum of f(i) for i in [0, n); always inlined, so that it is built for its caller's instruction set
template <typename F>
__attribute__((always_inline)) inline double sum(int64_t n, F f) {
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
  bool silu;
  int64_t per_group() const { return channels / groups; }
};

bool shape_of(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int conf, Shape &s) {
  if (nparam != expected || ndims[0] < 2 || ndims[conf] != 2 || shapes[conf][1] != 2) return false;
  if (!all_float32(nparam, dtypes)) return false;
  s.batch = shapes[0][0], s.channels = shapes[0][1], s.spatial = 1, s.groups = shapes[conf][0];
  for (int d = 2; d < ndims[0]; ++d) s.spatial *= shapes[0][d];
  return s.groups > 0 && s.channels % s.groups == 0;
}

// one (sample, group) of n = channels per group x spatial elements: its statistics and y
CLONES void forward_group(const Shape &s, const float *__restrict xs, const float *w, const float *b, double eps,
                          float *__restrict ys, float &mean, float &rstd) {
  const int64_t n = s.per_group() * s.spatial;
  const double m = sum(n, [&](int64_t i) { return xs[i]; }) / n;
  const float mf = static_cast<float>(m);
  const double var = sum(n, [&](int64_t i) { return (xs[i] - mf) * (xs[i] - mf); }) / n;
  const double r = 1.0 / std::sqrt(var + eps);
  mean = mf, rstd = static_cast<float>(r);
  for (int64_t c = 0; c < s.per_group(); ++c) {
    const float scale = static_cast<float>(r * w[c]), shift = static_cast<float>(b[c] - m * r * w[c]);
    const float *xc = xs + c * s.spatial;
    float *yc = ys + c * s.spatial;
    for (int64_t i = 0; i < s.spatial; ++i) yc[i] = xc[i] * scale + shift;
    if (s.silu)
      for (int64_t i = 0; i < s.spatial; ++i) yc[i] = yc[i] * sigmoid(yc[i]);
  }
}

// one (sample, group) of the backward: dx, and per channel the sums of dz and dz * xhat (dz = dy through SiLU, held
// in dx until the last pass overwrites it)
CLONES void backward_group(const Shape &s, const float *__restrict dys, const float *__restrict xs, const float *w,
                           const float *b, float m, float r, float *__restrict dxs, double *dz_sum, double *dz_xhat_sum) {
  const int64_t cg = s.per_group(), n = cg * s.spatial;
  const float *dz = dys;
  if (s.silu) {  // d silu(z) / dz = sig * (1 + z * (1 - sig)), z recomputed from x
    for (int64_t c = 0; c < cg; ++c) {
      const float scale = r * w[c], shift = b[c] - m * r * w[c];
      const float *xc = xs + c * s.spatial, *dyc = dys + c * s.spatial;
      float *dzc = dxs + c * s.spatial;
      for (int64_t i = 0; i < s.spatial; ++i) {
        const float z = xc[i] * scale + shift, sig = sigmoid(z);
        dzc[i] = dyc[i] * (sig * (1.0f + z * (1.0f - sig)));
      }
    }
    dz = dxs;
  }
  double s1 = 0.0, s2 = 0.0;  // sums over the group of w * dz and w * dz * xhat
  for (int64_t c = 0; c < cg; ++c) {
    const float *dzc = dz + c * s.spatial, *xc = xs + c * s.spatial;
    dz_sum[c] = sum(s.spatial, [&](int64_t i) { return dzc[i]; });
    dz_xhat_sum[c] = sum(s.spatial, [&](int64_t i) { return dzc[i] * ((xc[i] - m) * r); });
    s1 += w[c] * dz_sum[c], s2 += w[c] * dz_xhat_sum[c];
  }
  const float a = static_cast<float>(s1 / n), bb = static_cast<float>(s2 / n);
  for (int64_t c = 0; c < cg; ++c) {
    const float *dzc = dz + c * s.spatial, *xc = xs + c * s.spatial;
    float *dxc = dxs + c * s.spatial;
    const float wc = w[c];
    for (int64_t i = 0; i < s.spatial; ++i) dxc[i] = r * (dzc[i] * wc - a - (xc[i] - m) * r * bb);
  }
}

}  // namespace

extern "C" {

int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  Shape s;
  if (!shape_of(nparam, 7, ndims, shapes, dtypes, 3, s)) return 1;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]), *conf = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]), *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  s.silu = conf[1] != 0.0f;
  const int64_t n = s.per_group() * s.spatial;
  threadpool().parallel_for(static_cast<int>(s.batch * s.groups), [&](int task, int) {
    const int64_t first = static_cast<int64_t>(task) * n;  // (b, g) groups are contiguous: b * C * HW + g * cg * HW
    const int64_t c0 = (task % s.groups) * s.per_group();
    forward_group(s, x + first, w + c0, b + c0, conf[0], y + first, mean[task], rstd[task]);
  });
  return 0;
}

int GroupNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  Shape s;
  if (!shape_of(nparam, 10, ndims, shapes, dtypes, 6, s)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]), *b = static_cast<const float *>(params[3]);
  const float *mean = static_cast<const float *>(params[4]), *rstd = static_cast<const float *>(params[5]);
  s.silu = static_cast<const float *>(params[6])[1] != 0.0f;
  float *dx = static_cast<float *>(params[7]), *dw = static_cast<float *>(params[8]);
  float *db = static_cast<float *>(params[9]);
  const int64_t cg = s.per_group(), n = cg * s.spatial;
  // per (sample, channel): sum of dz and of dz * xhat; the weight and bias gradients sum them over the batch
  std::vector<double> dz_sum(s.batch * s.channels), dz_xhat_sum(s.batch * s.channels);
  threadpool().parallel_for(static_cast<int>(s.batch * s.groups), [&](int task, int) {
    const int64_t first = static_cast<int64_t>(task) * n, c0 = (task % s.groups) * cg;
    const int64_t row = (task / s.groups) * s.channels + c0;  // index of (b, c0) in the (B, C) sums
    backward_group(s, dy + first, x + first, w + c0, b + c0, mean[task], rstd[task], dx + first, &dz_sum[row],
                   &dz_xhat_sum[row]);
  });
  for (int64_t c = 0; c < s.channels; ++c) {
    double gw = 0.0, gb = 0.0;
    for (int64_t i = 0; i < s.batch; ++i) gw += dz_xhat_sum[i * s.channels + c], gb += dz_sum[i * s.channels + c];
    dw[c] = static_cast<float>(gw), db[c] = static_cast<float>(gb);
  }
  return 0;
}
}
