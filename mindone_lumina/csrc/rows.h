// What the norm and softmax kernels share (softmax.cc, row_norm.cc, group_norm.cc): argument checks, the spread of a
// last axis's rows over threadpool.h, CLONES, which builds a row function for AVX-512, AVX2 and the baseline, chosen
// at load time (the loops are plain float code the compiler vectorises), and exp / sigmoid that vectorise in them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "threadpool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define CLONES
#endif

// whether every one of the nparam inputs and outputs is float32
inline bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::string(dtypes[i]) != "float32") return false;
  return true;
}

// (number of rows, row length n) of the first input, or false for an input count, shape or dtype the kernel does not
// take (every input float32)
inline bool rows_of(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int64_t &rows,
                    int64_t &n) {
  if (nparam != expected || ndims[0] < 1 || !all_float32(nparam, dtypes)) return false;
  n = shapes[0][ndims[0] - 1], rows = 1;
  for (int d = 0; d + 1 < ndims[0]; ++d) rows *= shapes[0][d];
  return n > 0;
}

// fn(first row, end row) over blocks of rows, about four blocks per thread
template <typename F>
void over_rows(int64_t rows, F fn) {
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * threadpool().get_num_threads()));
  const int64_t block = (rows + tasks - 1) / tasks;
  threadpool().parallel_for(static_cast<int>((rows + block - 1) / block), [&](int task, int) {
    const int64_t first = task * block;
    fn(first, std::min(rows, first + block));
  });
}

// exp of x <= 0: a Cephes-style range reduction (x = n ln2 + r, |r| <= ln2 / 2) with a degree-6 polynomial, within
// 1 ulp of the correctly rounded exp on every float of [-87, 0] (checked against double exp); below -87 it returns 0
// (exp is under 1.7e-38 there). Plain float code the compiler vectorises inside a CLONES loop.
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

// 1 / (1 + exp(-z)) through exp_nonpositive of -|z|: vectorises, and never overflows
inline float sigmoid(float z) {
  const float e = exp_nonpositive(z < 0.0f ? z : -z);
  return (z < 0.0f ? e : 1.0f) / (1.0f + e);
}
