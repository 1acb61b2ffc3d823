// Kernels over the rows of a float32 tensor's last axis (softmax.cc, row_norm.cc): argument checks, the spread of
// rows over threadpool.h, and CLONES, which builds a row function for AVX-512, AVX2 and the baseline, chosen at load
// time (the loops are plain float code the compiler vectorises).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "threadpool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define CLONES
#endif

// (number of rows, row length n) of the first input, or false for an input count, shape or dtype the kernel does not
// take (every input float32)
inline bool rows_of(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, int64_t &rows,
                    int64_t &n) {
  if (nparam != expected || ndims[0] < 1) return false;
  for (int i = 0; i < nparam; ++i)
    if (std::string(dtypes[i]) != "float32") return false;
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
