// RMSNorm and LayerNorm over the last axis with their affine and modulation steps, and the gradient, as MindSpore AOT
// custom ops on CPU. The portable path (backend.py) builds a norm from Square, two row-mean matmuls, Add, Rsqrt and
// Mul kernels, then a matmul by ones and a Mul per weight, per adaLN scale and per shift, each with its gradient
// kernels; a small model's training step is mostly such kernels (benchmarks/README). Here each row is one pass forward
// and one backward, rows spread over threadpool.h.
//
// Float32, contiguous. Inputs: x (rows, n) of any rank >= 1, rows being the last axis; weight (n); scale (Gs, n);
// shift (Gc, n); conf (5) = eps, centred, has weight, has scale, has shift. A missing input is any float32 tensor,
// read nowhere (its gradient is zeros). Row r belongs to group r / (rows / G) of scale and of shift: (1, n) is one
// vector for every row, (B, n) one per sample of a (B, L, n) x.
// Forward: y = ((norm(x) * weight) * scale) + shift, in that order (the portable path's roundings), and rstd (rows).
//          RMS: norm(x) = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
//          Layer: norm(x) = (x - mean(x)) * rstd, rstd = 1 / sqrt(mean((x - mean)^2) + eps).
// Backward: dy, x, weight, scale, shift, rstd, conf -> dx, dweight, dscale, dshift. With u = norm(x) * weight,
//           dshift = sum dy, dscale = sum dy * u over each group's rows, dweight = sum over rows of dy * scale * norm,
//           and with g = dy * scale * weight: RMS dx = rstd * (g - norm * mean(g * norm)),
//           Layer dx = rstd * (g - mean(g) - norm * mean(g * norm)).
// Sums run in double: row sums in 16 lanes (rows are short: a model width), column sums per block of rows, the
// blocks added in row order (blocks are set by the shapes, so the result does not depend on the thread count).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rows.h"

namespace {

constexpr int kLanes = 16;

// sum over i < n of f(i), in double lanes; always inlined, so that it is built for its caller's instruction set
template <typename F>
__attribute__((always_inline)) inline double row_sum(int64_t n, F f) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += f(i + k);
  double total = 0.0;
  for (; i < n; ++i) total += f(i);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

int64_t numel(int ndim, const int64_t *shape) {
  int64_t total = 1;
  for (int d = 0; d < ndim; ++d) total *= shape[d];
  return total;
}

// One call's geometry and optional factors, checked against the input shapes (false: a shape the op does not take).
struct Norm {
  int64_t rows = 1, n = 0;
  double eps = 0.0;
  bool centred = false;
  const float *weight = nullptr, *scale = nullptr, *shift = nullptr;
  int64_t scale_rows = 0, shift_rows = 0;  // rows per group

  bool parse(int nparam, int expected, void **params, int *ndims, int64_t **shapes, const char **dtypes, int first) {
    if (nparam != expected || ndims[0] < 1 || !all_float32(nparam, dtypes)) return false;
    const int conf_at = expected - (first == 0 ? 3 : 5);  // forward: x w s c conf y rstd; backward: ... conf dx dw ds dc
    if (numel(ndims[conf_at], shapes[conf_at]) != 5) return false;
    const float *conf = static_cast<const float *>(params[conf_at]);
    eps = conf[0], centred = conf[1] != 0.0f;
    n = shapes[first][ndims[first] - 1];
    rows = numel(ndims[first] - 1, shapes[first]);
    if (n <= 0) return false;
    const int at = first + 1;  // weight, scale, shift follow x
    if (conf[2] != 0.0f) {
      if (numel(ndims[at], shapes[at]) != n) return false;
      weight = static_cast<const float *>(params[at]);
    }
    if (!group(conf[3], at + 1, params, ndims, shapes, scale, scale_rows) ||
        !group(conf[4], at + 2, params, ndims, shapes, shift, shift_rows))
      return false;
    // blocks of rows must fit both groupings: one's rows per group a multiple of the other's
    return !(scale && shift) || std::max(scale_rows, shift_rows) % std::min(scale_rows, shift_rows) == 0;
  }

  bool group(float present, int at, void **params, int *ndims, int64_t **shapes, const float *&data, int64_t &per) {
    if (present == 0.0f) return true;
    const int64_t total = numel(ndims[at], shapes[at]);
    if (total % n || total == 0 || rows % (total / n)) return false;
    data = static_cast<const float *>(params[at]), per = rows / (total / n);
    return true;
  }

  const float *scale_row(int64_t r) const { return scale + (r / scale_rows) * n; }
  const float *shift_row(int64_t r) const { return shift + (r / shift_rows) * n; }

  // (mean, rstd) of row xr
  __attribute__((always_inline)) void stats(const float *xr, float &mean, float &rstd) const {
    mean = centred ? static_cast<float>(row_sum(n, [&](int64_t i) { return xr[i]; }) / n) : 0.0f;
    const float m = mean;
    const double square = row_sum(n, [&](int64_t i) { return double(xr[i] - m) * (xr[i] - m); }) / n;
    rstd = static_cast<float>(1.0 / std::sqrt(square + eps));
  }
};

// Blocks of rows that never straddle a group of scale or shift, numbered in row order. Their size depends on the
// shapes only, not on the thread count, so that the column sums of the backward do not either.
struct Blocks {
  int64_t unit, size, per_unit, count;  // rows per finest group, rows per block, blocks per unit, blocks

  explicit Blocks(const Norm &g) {
    if (g.rows == 0) {  // an empty batch: no blocks
      unit = size = per_unit = 1, count = 0;
      return;
    }
    unit = g.rows;
    if (g.scale) unit = std::min(unit, g.scale_rows);
    if (g.shift) unit = std::min(unit, g.shift_rows);
    size = std::min(unit, std::max<int64_t>(16, (g.rows + 255) / 256));  // at most about 256 blocks of 16 rows or more
    per_unit = (unit + size - 1) / size;
    count = g.rows / unit * per_unit;
  }

  // fn(first row, end row, block index) for every block, spread over threadpool.h
  template <typename F>
  void run(F fn) const {
    threadpool().parallel_for(static_cast<int>(count), [&](int task, int) {
      const int64_t u = task / per_unit, first = u * unit + (task % per_unit) * size;
      fn(first, std::min(u * unit + unit, first + size), static_cast<int64_t>(task));
    });
  }
};

// one row: y = ((norm * weight) * scale) + shift (each factor may be null); returns rstd
CLONES float forward_row(const Norm &g, const float *__restrict xr, float *__restrict yr, const float *sr,
                         const float *cr) {
  const int64_t n = g.n;
  float mean, s;
  g.stats(xr, mean, s);
  for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * s;
  if (g.weight)
    for (int64_t i = 0; i < n; ++i) yr[i] = yr[i] * g.weight[i];
  if (sr)
    for (int64_t i = 0; i < n; ++i) yr[i] = yr[i] * sr[i];
  if (cr)
    for (int64_t i = 0; i < n; ++i) yr[i] = yr[i] + cr[i];
  return s;
}

int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Norm g;
  if (!g.parse(nparam, 7, params, ndims, shapes, dtypes, 0)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[5]), *rstd = static_cast<float *>(params[6]);
  Blocks(g).run([&](int64_t first, int64_t end, int64_t) {
    for (int64_t r = first; r < end; ++r) {
      const float *sr = g.scale ? g.scale_row(r) : nullptr, *cr = g.shift ? g.shift_row(r) : nullptr;
      rstd[r] = forward_row(g, x + r * g.n, y + r * g.n, sr, cr);
    }
  });
  return 0;
}

// one row of the backward: dx, and this row's terms added to the column sums acc_w, acc_s, acc_c (each may be null)
CLONES void backward_row(const Norm &g, const float *__restrict dyr, const float *__restrict xr, float s,
                         const float *sr, float *__restrict dxr, double *acc_w, double *acc_s, double *acc_c,
                         float *__restrict work) {
  const int64_t n = g.n;
  float *__restrict norm = work, *__restrict grad = work + n;
  const float mean = g.centred ? static_cast<float>(row_sum(n, [&](int64_t i) { return xr[i]; }) / n) : 0.0f;
  for (int64_t i = 0; i < n; ++i) norm[i] = (xr[i] - mean) * s;
  for (int64_t i = 0; i < n; ++i) grad[i] = sr ? dyr[i] * sr[i] : dyr[i];  // d(norm * weight)
  if (acc_c)
    for (int64_t i = 0; i < n; ++i) acc_c[i] += dyr[i];
  if (acc_s)
    for (int64_t i = 0; i < n; ++i) acc_s[i] += double(dyr[i]) * (g.weight ? norm[i] * g.weight[i] : norm[i]);
  if (acc_w)
    for (int64_t i = 0; i < n; ++i) acc_w[i] += double(grad[i]) * norm[i];
  if (g.weight)
    for (int64_t i = 0; i < n; ++i) grad[i] *= g.weight[i];  // d(norm)
  const float grad_mean = g.centred ? static_cast<float>(row_sum(n, [&](int64_t i) { return grad[i]; }) / n) : 0.0f;
  const float dot = static_cast<float>(row_sum(n, [&](int64_t i) { return double(grad[i]) * norm[i]; }) / n);
  for (int64_t i = 0; i < n; ++i) dxr[i] = s * (grad[i] - grad_mean - norm[i] * dot);
}

int backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Norm g;
  if (!g.parse(nparam, 11, params, ndims, shapes, dtypes, 1)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *rstd = static_cast<const float *>(params[5]);
  float *dx = static_cast<float *>(params[7]);
  float *dweight = static_cast<float *>(params[8]), *dscale = static_cast<float *>(params[9]);
  float *dshift = static_cast<float *>(params[10]);
  const int64_t n = g.n;
  // per block: column sums of dy * scale * norm (weight), dy * norm * weight (scale), dy (shift)
  const int parts = (g.weight ? 1 : 0) + (g.scale ? 1 : 0) + (g.shift ? 1 : 0);
  const Blocks blocks(g);
  std::vector<double> partial(static_cast<size_t>(blocks.count * parts * n), 0.0);
  blocks.run([&](int64_t first, int64_t end, int64_t block) {
    double *acc = partial.data() + block * parts * n;
    double *acc_w = g.weight ? acc : nullptr;
    double *acc_s = g.scale ? acc + (g.weight ? n : 0) : nullptr;
    double *acc_c = g.shift ? acc + (parts - 1) * n : nullptr;
    std::vector<float> work(2 * n);
    for (int64_t r = first; r < end; ++r) {
      const float *sr = g.scale ? g.scale_row(r) : nullptr;
      backward_row(g, dy + r * n, x + r * n, rstd[r], sr, dx + r * n, acc_w, acc_s, acc_c, work.data());
    }
  });
  // the blocks' column sums into each output row, in row order; a missing input's gradient is zeros
  auto reduce = [&](float *out, int64_t out_numel, const float *present, int offset, int64_t rows_per) {
    std::fill(out, out + out_numel, 0.0f);
    if (!present || g.rows == 0) return;
    const int64_t groups = g.rows / rows_per;
    std::vector<double> total(static_cast<size_t>(groups * n), 0.0);
    const int64_t blocks_per_group = blocks.count / groups;
    for (int64_t b = 0; b < blocks.count; ++b) {
      const double *src = partial.data() + (b * parts + offset) * n;
      double *dst = total.data() + (b / blocks_per_group) * n;
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
    }
    for (int64_t i = 0; i < groups * n; ++i) out[i] = static_cast<float>(total[i]);
  };
  reduce(dweight, numel(ndims[8], shapes[8]), g.weight, 0, g.rows);
  reduce(dscale, numel(ndims[9], shapes[9]), g.scale, g.weight ? 1 : 0, g.scale_rows);
  reduce(dshift, numel(ndims[10], shapes[10]), g.shift, parts - 1, g.shift_rows);
  return 0;
}

}  // namespace

extern "C" {

int RowNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return forward(nparam, params, ndims, shapes, dtypes);
}

int RowNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return backward(nparam, params, ndims, shapes, dtypes);
}
}
