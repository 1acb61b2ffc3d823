// Softmax over the last axis and its gradient as MindSpore AOT custom ops on CPU, for the attention scores.
// MindSpore 2.10 computes the softmax gradient as Mul, ReduceSum, Sub and Mul kernels, each a full pass over the
// (B, N, L, S) scores, and its CPU ReduceSum over the last axis of that tensor ran at about 2 GB/s: 65 ms of the
// 531 ms of kernels in a training step of the bench model (benchmarks/README). Here each row is one pass forward
// (max, then exp and sum, then scale) and one backward, rows spread over threadpool.h (rows.h).
//
// Float32, contiguous, any rank >= 1; the softmax runs over the last axis.
// Forward: x -> y. Backward: dy, y -> dx = y * (dy - sum(dy * y)).
// exp is rows.h's exp_nonpositive (0 below -87, so that the attention's -1e30 mask gives exactly 0). The row loops
// are built per instruction set (CLONES, rows.h).

#include <cstdint>

#include "rows.h"

namespace {

constexpr int kLanes = 16;  // independent partial results per row, so that the reductions vectorise

CLONES void softmax_row(const float *__restrict x, float *__restrict y, int64_t n) {
  float lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] = x[i + k] > lanes[k] ? x[i + k] : lanes[k];
  float m = x[0];
  for (int k = 0; k < kLanes; ++k) m = lanes[k] > m ? lanes[k] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  for (int k = 0; k < kLanes; ++k) lanes[k] = 0.0f;
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      y[i + k] = exp_nonpositive(x[i + k] - m);
      lanes[k] += y[i + k];
    }
  float total = 0.0f;
  for (; i < n; ++i) {
    y[i] = exp_nonpositive(x[i] - m);
    total += y[i];
  }
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  const float inv = 1.0f / total;
  for (i = 0; i < n; ++i) y[i] *= inv;
}

CLONES void softmax_grad_row(const float *__restrict dy, const float *__restrict y, float *__restrict dx, int64_t n) {
  double lanes[kLanes] = {};  // in double: dy - dot cancels, and the dot's rounding would show in dx
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(dy[i + k]) * y[i + k];
  double total = 0.0;
  for (; i < n; ++i) total += static_cast<double>(dy[i]) * y[i];
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  const float dot = static_cast<float>(total);
  for (i = 0; i < n; ++i) dx[i] = y[i] * (dy[i] - dot);
}

}  // namespace

extern "C" {

int SoftmaxForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  int64_t rows, n;
  if (!rows_of(nparam, 2, ndims, shapes, dtypes, rows, n)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  over_rows(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; ++r) softmax_row(x + r * n, y + r * n, n);
  });
  return 0;
}

int SoftmaxBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  int64_t rows, n;
  if (!rows_of(nparam, 3, ndims, shapes, dtypes, rows, n)) return 1;
  const float *dy = static_cast<const float *>(params[0]), *y = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  over_rows(rows, [&](int64_t first, int64_t end) {
    for (int64_t r = first; r < end; ++r) softmax_grad_row(dy + r * n, y + r * n, dx + r * n, n);
  });
  return 0;
}
}
