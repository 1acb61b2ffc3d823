// Softmax over the last axis and its gradient as MindSpore AOT custom ops on CPU, for the attention scores.
// MindSpore 2.10 computes the softmax gradient as Mul, ReduceSum, Sub and Mul kernels, each a full pass over the
// (B, N, L, S) scores, and its CPU ReduceSum over the last axis of that tensor ran at about 2 GB/s: 65 ms of the
// 531 ms of kernels in a training step of the bench model (benchmarks/README). Here each row is one pass forward
// (max, then exp and sum, then scale) and one backward, rows spread over threadpool.h (rows.h).
//
// Float32, contiguous, any rank >= 1; the softmax runs over the last axis.
// Forward: x -> y. Backward: dy, y -> dx = y * (dy - sum(dy * y)).
// exp is a Cephes-style range reduction (x = n ln2 + r, |r| <= ln2 / 2) with a degree-6 polynomial: within 1 ulp of
// the correctly rounded exp on every float of [-87, 0], the range a softmax sees (x - max <= 0; checked against
// double exp). Below -87 it returns 0 (exp is under 1.7e-38 there), so that the attention's -1e30 mask gives exactly
// 0. The row loops are built per instruction set (CLONES, rows.h).

#include <cstdint>
#include <cstring>

#include "rows.h"

namespace {

constexpr int kLanes = 16;  // independent partial results per row, so that the reductions vectorise

inline float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = clamped - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);  // p * 2^n, a normal float for n >= -126
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return x < -87.0f ? 0.0f : y;
}

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
