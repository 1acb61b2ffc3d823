// 2-D convolution (forward, data gradient, weight gradient) as MindSpore AOT custom ops on CPU, run by oneDNN's
// blocked-layout kernels: the ones torch's CPU conv uses, which MindSpore 2.10's own Conv2D never reaches because it
// fixes plain NCHW/OIHW memory (see backend.py, "Convolution"). Built by cpu_kernels.py against MindSpore's own
// libdnnl.so.3 (oneDNN 3.x, threadpool runtime: its stream runs on threadpool.h); the few C API declarations below
// are written from oneDNN's public headers, which the wheel does not ship.
//
// Every op takes float32 NCHW / OIHW tensors and a geometry tensor whose shape is (stride, padding + 1): shapes are
// what both the kernel and MindSpore's shape inference see, so the geometry travels as one. A primitive is created
// once per shape and kept; activations and weights are reordered to the layouts the primitive chose on each call (as
// torch does), in buffers freed on return.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "threadpool.h"

extern "C" {
typedef int status_t;  // dnnl_status_t; 0 = success
typedef int64_t dims_t[12];  // dnnl_dims_t (DNNL_MAX_NDIMS = 12)
typedef void *engine_t, *stream_t, *md_t, *pd_t, *prim_t, *mem_t;
typedef struct {
  int arg;
  mem_t memory;
} exec_arg_t;

status_t dnnl_engine_create(engine_t *engine, int kind, size_t index);
status_t dnnl_threadpool_interop_stream_create(stream_t *stream, engine_t engine, void *threadpool);
status_t dnnl_memory_desc_create_with_tag(md_t *md, int ndims, const dims_t dims, int data_type, int tag);
status_t dnnl_memory_desc_destroy(md_t md);
size_t dnnl_memory_desc_get_size(const void *md);
int dnnl_memory_desc_equal(const void *lhs, const void *rhs);
status_t dnnl_convolution_forward_primitive_desc_create(pd_t *pd, engine_t engine, int prop_kind, int alg_kind,
                                                        const void *src, const void *weights, const void *bias,
                                                        const void *dst, const dims_t strides, const dims_t dilates,
                                                        const dims_t padding_l, const dims_t padding_r,
                                                        const void *attr);
status_t dnnl_convolution_backward_data_primitive_desc_create(pd_t *pd, engine_t engine, int alg_kind,
                                                              const void *diff_src, const void *weights,
                                                              const void *diff_dst, const dims_t strides,
                                                              const dims_t dilates, const dims_t padding_l,
                                                              const dims_t padding_r, const void *hint_fwd_pd,
                                                              const void *attr);
status_t dnnl_convolution_backward_weights_primitive_desc_create(pd_t *pd, engine_t engine, int alg_kind,
                                                                 const void *src, const void *diff_weights,
                                                                 const void *diff_bias, const void *diff_dst,
                                                                 const dims_t strides, const dims_t dilates,
                                                                 const dims_t padding_l, const dims_t padding_r,
                                                                 const void *hint_fwd_pd, const void *attr);
const void *dnnl_primitive_desc_query_md(const void *pd, int what, int index);
status_t dnnl_primitive_desc_destroy(pd_t pd);
status_t dnnl_reorder_primitive_desc_create(pd_t *pd, const void *src_md, engine_t src_engine, const void *dst_md,
                                            engine_t dst_engine, const void *attr);
status_t dnnl_primitive_create(prim_t *primitive, const void *pd);
status_t dnnl_primitive_execute(const void *primitive, stream_t stream, int nargs, const exec_arg_t *args);
status_t dnnl_memory_create(mem_t *memory, const void *md, engine_t engine, void *handle);
status_t dnnl_memory_destroy(mem_t memory);
status_t dnnl_stream_wait(stream_t stream);
}

namespace {

// enum values of oneDNN 3.x (dnnl_types.h, dnnl_common_types.h)
constexpr int kCpu = 1, kF32 = 3, kAny = 1, kPlain1d = 2, kPlain4d = 5;  // dnnl_cpu, dnnl_f32, format tags any, a, abcd
constexpr int kForwardTraining = 64, kForwardInference = 96, kConvolutionDirect = 1;
constexpr int kQueryExecArgMd = 255;
constexpr int kSrc = 1, kDst = 17, kWeights = 33, kBias = 41, kDiffSrc = 129, kDiffDst = 145, kDiffWeights = 161;
constexpr int kDiffBias = 169;

struct Runtime {
  engine_t engine = nullptr;
  stream_t stream = nullptr;
  ThreadpoolIface *pool = nullptr;
};

// A primitive and, per argument, the plain descriptor of the caller's tensor and the one the primitive chose.
struct Arg {
  int id;
  md_t plain;
  const void *chosen;
  prim_t to_chosen = nullptr, to_plain = nullptr;  // reorders, where the two differ
};
struct Entry {
  pd_t pd = nullptr;
  prim_t prim = nullptr;
  std::vector<Arg> args;
};

enum Kind { kForward, kBackwardData, kBackwardWeights };

std::mutex lock;  // the graph's actors may launch two convs at once; the cache and the stream are shared
std::map<std::vector<int64_t>, Entry> cache;

bool ok(status_t status, const char *what) {
  if (status != 0) std::fprintf(stderr, "onednn_conv: %s failed with oneDNN status %d\n", what, status);
  return status == 0;
}

Runtime *runtime() {
  static Runtime *rt = [] {
    auto *r = new Runtime;
    r->pool = &threadpool();
    if (!ok(dnnl_engine_create(&r->engine, kCpu, 0), "engine") ||
        !ok(dnnl_threadpool_interop_stream_create(&r->stream, r->engine, static_cast<void *>(r->pool)), "stream"))
      return static_cast<Runtime *>(nullptr);
    return r;
  }();
  return rt;
}

// a 4-D tensor's descriptor, or with ndims 1 the bias (O,) of the weights' shape
md_t plain_md(const int64_t *shape, int tag, int ndims = 4) {
  dims_t dims = {shape[0], shape[1], shape[2], shape[3]};
  md_t md = nullptr;
  return ok(dnnl_memory_desc_create_with_tag(&md, ndims, dims, kF32, tag), "memory descriptor") ? md : nullptr;
}

bool add_arg(Entry &e, Runtime *rt, int id, const int64_t *shape, bool output, int ndims = 4) {
  Arg a{id, plain_md(shape, ndims == 4 ? kPlain4d : kPlain1d, ndims),
        dnnl_primitive_desc_query_md(e.pd, kQueryExecArgMd, id)};
  if (a.plain == nullptr || a.chosen == nullptr) return false;
  if (!dnnl_memory_desc_equal(a.plain, a.chosen)) {
    pd_t rpd = nullptr;
    const void *from = output ? a.chosen : a.plain, *to = output ? a.plain : a.chosen;
    if (!ok(dnnl_reorder_primitive_desc_create(&rpd, from, rt->engine, to, rt->engine, nullptr), "reorder") ||
        !ok(dnnl_primitive_create(output ? &a.to_plain : &a.to_chosen, rpd), "reorder primitive"))
      return false;
    dnnl_primitive_desc_destroy(rpd);
  }
  e.args.push_back(a);
  return true;
}

// shapes: x (B, C, H, W), w (O, C, kh, kw), y (B, O, Ho, Wo); the bias is (O,). The entry's args are ordered as the
// op's tensors: inputs first, outputs last.
Entry *entry(Kind kind, const int64_t *x, const int64_t *w, const int64_t *y, int64_t stride, int64_t padding) {
  std::vector<int64_t> key = {kind, stride, padding};
  for (const int64_t *s : {x, w, y}) key.insert(key.end(), s, s + 4);
  auto found = cache.find(key);
  if (found != cache.end()) return &found->second;
  Runtime *rt = runtime();
  if (rt == nullptr) return nullptr;
  dims_t strides = {stride, stride}, dilates = {0, 0}, pad = {padding, padding};
  md_t any_x = plain_md(x, kAny), any_w = plain_md(w, kAny), any_y = plain_md(y, kAny), bias = plain_md(w, kPlain1d, 1);
  pd_t fwd = nullptr;
  Entry e;
  bool built = ok(dnnl_convolution_forward_primitive_desc_create(
                      &fwd, rt->engine, kind == kForward ? kForwardInference : kForwardTraining, kConvolutionDirect,
                      any_x, any_w, bias, any_y, strides, dilates, pad, pad, nullptr),
                  "convolution forward descriptor");
  if (built && kind == kForward) {
    e.pd = fwd, fwd = nullptr;
    built = add_arg(e, rt, kSrc, x, false) && add_arg(e, rt, kWeights, w, false) &&
            add_arg(e, rt, kBias, w, false, 1) && add_arg(e, rt, kDst, y, true);
  } else if (built && kind == kBackwardData) {
    built = ok(dnnl_convolution_backward_data_primitive_desc_create(&e.pd, rt->engine, kConvolutionDirect, any_x, any_w,
                                                                    any_y, strides, dilates, pad, pad, fwd, nullptr),
               "convolution backward-data descriptor") &&
            add_arg(e, rt, kDiffDst, y, false) && add_arg(e, rt, kWeights, w, false) &&
            add_arg(e, rt, kDiffSrc, x, true);
  } else if (built) {
    built = ok(dnnl_convolution_backward_weights_primitive_desc_create(&e.pd, rt->engine, kConvolutionDirect, any_x,
                                                                       any_w, bias, any_y, strides, dilates, pad,
                                                                       pad, fwd, nullptr),
               "convolution backward-weights descriptor") &&
            add_arg(e, rt, kDiffDst, y, false) && add_arg(e, rt, kSrc, x, false) &&
            add_arg(e, rt, kDiffWeights, w, true) && add_arg(e, rt, kDiffBias, w, true, 1);
  }
  built = built && ok(dnnl_primitive_create(&e.prim, e.pd), "convolution primitive");
  for (md_t md : {any_x, any_w, any_y, bias}) dnnl_memory_desc_destroy(md);
  if (fwd != nullptr) dnnl_primitive_desc_destroy(fwd);
  if (!built) return nullptr;  // the half-built entry leaks: this process has already failed
  return &cache.emplace(key, e).first->second;
}

// Runs the entry on the caller's plain buffers (in the order of its args), reordering through temporary buffers.
bool execute(Entry *e, const std::vector<void *> &plain) {
  Runtime *rt = runtime();
  std::vector<mem_t> mems;
  std::vector<void *> buffers;
  std::vector<exec_arg_t> conv_args;
  bool good = true;
  auto memory = [&](const void *md, void *data) {
    mem_t m = nullptr;
    good = good && ok(dnnl_memory_create(&m, md, rt->engine, data), "memory");
    mems.push_back(m);
    return m;
  };
  auto reorder = [&](prim_t prim, mem_t from, mem_t to) {
    exec_arg_t args[2] = {{kSrc, from}, {kDst, to}};
    good = good && ok(dnnl_primitive_execute(prim, rt->stream, 2, args), "reorder");
  };
  struct Pending {
    prim_t reorder;
    mem_t chosen, user;
  };
  std::vector<Pending> outputs;  // the outputs to reorder to the caller's layout after the conv
  for (size_t i = 0; i < e->args.size() && good; ++i) {
    const Arg &a = e->args[i];
    mem_t user = memory(a.plain, plain[i]);
    if (a.to_chosen == nullptr && a.to_plain == nullptr) {
      conv_args.push_back({a.id, user});
      continue;
    }
    size_t size = (dnnl_memory_desc_get_size(a.chosen) + 63) / 64 * 64;
    void *data = std::aligned_alloc(64, size);
    if (data == nullptr) {
      std::fprintf(stderr, "onednn_conv: out of memory for a %zu-byte reorder buffer\n", size);
      good = false;
      break;
    }
    buffers.push_back(data);
    mem_t chosen = memory(a.chosen, data);
    conv_args.push_back({a.id, chosen});
    if (a.to_chosen != nullptr) reorder(a.to_chosen, user, chosen);
    if (a.to_plain != nullptr) outputs.push_back({a.to_plain, chosen, user});
  }
  good = good && ok(dnnl_primitive_execute(e->prim, rt->stream, static_cast<int>(conv_args.size()), conv_args.data()),
                    "convolution");
  for (const Pending &o : outputs) reorder(o.reorder, o.chosen, o.user);
  good = good && ok(dnnl_stream_wait(rt->stream), "stream wait");
  for (mem_t m : mems)
    if (m != nullptr) dnnl_memory_destroy(m);
  for (void *b : buffers) std::free(b);
  return good;
}

// params: the inputs, then the outputs; the geometry is always params[3]. Forward: x, w, bias, geometry -> y.
// Backward data: dy, w, x, geometry -> dx (x only for its shape). Backward weights: dy, x, w, geometry -> dw, dbias
// (w only for its shape).
int run(Kind kind, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int expected = kind == kBackwardWeights ? 6 : 5;
  if (nparam != expected || ndims[3] != 2) return 1;
  for (int i = 0; i < nparam; ++i) {
    const bool bias = (kind == kForward && i == 2) || i == 5;
    if (i != 3 && (std::string(dtypes[i]) != "float32" || ndims[i] != (bias ? 1 : 4))) return 2;
  }
  const int64_t *x, *w, *y;
  std::vector<void *> tensors;  // in the order of the entry's args
  if (kind == kForward) {
    x = shapes[0], w = shapes[1], y = shapes[4];
    tensors = {params[0], params[1], params[2], params[4]};
  } else if (kind == kBackwardData) {
    y = shapes[0], w = shapes[1], x = shapes[4];
    tensors = {params[0], params[1], params[4]};
  } else {
    y = shapes[0], x = shapes[1], w = shapes[4];
    tensors = {params[0], params[1], params[4], params[5]};
  }
  std::lock_guard<std::mutex> guard(lock);
  Entry *e = entry(kind, x, w, y, shapes[3][0], shapes[3][1] - 1);
  return e != nullptr && execute(e, tensors) ? 0 : 3;
}

}  // namespace

extern "C" {
int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run(kForward, nparam, params, ndims, shapes, dtypes);
}
int ConvBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run(kBackwardData, nparam, params, ndims, shapes, dtypes);
}
int ConvBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run(kBackwardWeights, nparam, params, ndims, shapes, dtypes);
}
}
