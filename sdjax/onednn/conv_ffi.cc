// XLA FFI handlers running 2-D convolutions with oneDNN (CPU, OpenMP runtime).
//
// Layouts follow sdjax.conv.conv2d: activations NHWC, kernels HWIO with
// I = C_in / groups (lax's feature_group_count grouping). Three handlers:
//   sdjax_onednn_conv_fwd:  (x, w)  -> y      forward
//   sdjax_onednn_conv_bwd_data:    (g, w)  -> dx  input gradient
//   sdjax_onednn_conv_bwd_weights: (x, g)  -> dw  kernel gradient
// Attributes (all int64): stride_h, stride_w, pad_lo_h, pad_hi_h, pad_lo_w,
// pad_hi_w (padding may be asymmetric), groups, num_threads (<= 0: OpenMP's
// default). Element types: f32, or bf16 for every operand, except that the
// kernel gradient may be f32 for bf16 operands (summed across devices in f32).
//
// Builds against oneDNN 3.x (operation descriptors removed: primitive
// descriptors are constructed directly) and 2.x (behind DNNL_VERSION_MAJOR).
//
// Activations are used in place (oneDNN's nhwc tag); kernels are reordered
// per call between HWIO and the layout the primitive picks (format any),
// which keeps oneDNN on its direct kernels. Primitives (and their reorders)
// are built with the OpenMP thread count of the call, which is part of the
// cache key, and held in an LRU cache behind a mutex. Every primitive,
// reorders included, runs with a caller-owned (user) scratchpad, so
// concurrent calls (one per CPU device, or XLA's overlapping dx and dW calls)
// share no state. A process-wide thread budget (the usable cores) makes a
// call wait while other calls hold the cores: libgomp keeps one thread pool
// per calling thread, so overlapping calls would otherwise oversubscribe.
// Empty operands (e.g. batch 0) zero-fill the result without calling oneDNN.
//
// Also exports C-ABI helpers for the host: `sdjax_onednn_impl_info` (the
// implementation oneDNN picks for a case), `sdjax_onednn_stats` and
// `sdjax_onednn_set_cache_capacity`.

#include <omp.h>
#include <sched.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  int64_t n, c, h, w, o, kh, kw, ho, wo;
  int64_t sh, sw, plh, phh, plw, phw, groups;
  dnnl::memory::data_type dt;
  dnnl::memory::data_type dw_dt;  // kernel gradient's element type (bwd_weights only)
  int64_t threads;
};

using Key = std::vector<int64_t>;

Key MakeKey(int64_t kind, const Geometry& g) {
  return Key{kind,  g.n,   g.c,   g.h,      g.w,  g.o,  g.kh,
             g.kw,  g.ho,  g.wo,  g.sh,     g.sw, g.plh, g.phh,
             g.plw, g.phw, g.groups, static_cast<int64_t>(g.dt),
             static_cast<int64_t>(g.dw_dt), g.threads};
}

// Why a geometry is invalid, or empty when it is valid. Checked before any division by
// `groups` or `stride` and before oneDNN sees the sizes; the output size must be the one the
// input, kernel, strides and padding give.
std::string CheckGeometry(const Geometry& g) {
  if (g.groups < 1) return "groups must be >= 1";
  if (g.sh < 1 || g.sw < 1) return "strides must be >= 1";
  if (g.plh < 0 || g.phh < 0 || g.plw < 0 || g.phw < 0) return "padding must be >= 0";
  if (g.n < 0 || g.c < 1 || g.h < 1 || g.w < 1 || g.o < 1 || g.kh < 1 || g.kw < 1) {
    return "sizes must be positive (the batch may be 0)";
  }
  if (g.c % g.groups || g.o % g.groups) return "groups must divide the channel counts";
  const int64_t span_h = g.h + g.plh + g.phh - g.kh;
  const int64_t span_w = g.w + g.plw + g.phw - g.kw;
  if (span_h < 0 || span_w < 0) return "the padded input is smaller than the kernel";
  if (g.ho != span_h / g.sh + 1 || g.wo != span_w / g.sw + 1) {
    return "the output height/width do not match the input, kernel, strides and padding";
  }
  return "";
}

// One cached case: the primitive, the descriptor of the kernel as the primitive wants it,
// the user's HWIO kernel descriptor, and the reorder between them (empty when identical).
struct Entry {
  dnnl::primitive prim;
  dnnl::memory::desc scratch_md;
  dnnl::memory::desc prim_w_md;
  dnnl::memory::desc user_w_md;
  dnnl::primitive reorder;  // user -> prim (fwd, bwd_data) or prim -> user (bwd_weights)
  dnnl::memory::desc reorder_scratch_md;
  bool needs_reorder = false;
  std::string impl;
  int64_t built_threads = 0;  // omp_get_max_threads() when the primitive was built
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::desc ActivationDesc(int64_t n, int64_t c, int64_t h, int64_t w,
                                  dnnl::memory::data_type dt) {
  return dnnl::memory::desc({n, c, h, w}, dt, dnnl::memory::format_tag::nhwc);
}

// HWIO kernel (I = C / groups) as oneDNN weights dims: {O, I, KH, KW} or {G, O/G, I, KH, KW}.
dnnl::memory::dims WeightDims(const Geometry& g) {
  const int64_t ig = g.c / g.groups;
  if (g.groups == 1) return {g.o, ig, g.kh, g.kw};
  return {g.groups, g.o / g.groups, ig, g.kh, g.kw};
}

dnnl::memory::desc UserWeightDesc(const Geometry& g, dnnl::memory::data_type dt) {
  const int64_t ig = g.c / g.groups;
  const int64_t og = g.o / g.groups;
  // Element (kh, kw, i, o) of HWIO lives at ((kh * KW + kw) * I + i) * O + o, o = grp * og + j.
  if (g.groups == 1) {
    return dnnl::memory::desc(WeightDims(g), dt,
                              dnnl::memory::dims{1, g.o, g.kw * ig * g.o, ig * g.o});
  }
  return dnnl::memory::desc(WeightDims(g), dt,
                            dnnl::memory::dims{og, 1, g.o, g.kw * ig * g.o, ig * g.o});
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

void SetReorder(Entry* e, const dnnl::memory::desc& from, const dnnl::memory::desc& to) {
  auto& eng = Engine();
  dnnl::reorder::primitive_desc pd(eng, from, eng, to, UserScratchpad());
  e->reorder = dnnl::reorder(pd);
  e->reorder_scratch_md = pd.scratchpad_desc();
}

// Builds one case on the calling thread, whose OpenMP thread count (g.threads) oneDNN reads.
Entry Build(int64_t kind, const Geometry& g) {
  using dnnl::memory;
  auto& eng = Engine();
  const auto dt = g.dt;
  auto src_md = ActivationDesc(g.n, g.c, g.h, g.w, dt);
  auto dst_md = ActivationDesc(g.n, g.o, g.ho, g.wo, dt);
  auto any_w_md = memory::desc(WeightDims(g), dt, memory::format_tag::any);
  memory::dims strides{g.sh, g.sw}, pad_l{g.plh, g.plw}, pad_r{g.phh, g.phw};
  const dnnl::primitive_attr attr = UserScratchpad();
  const auto alg = dnnl::algorithm::convolution_direct;
  const auto prop = dnnl::prop_kind::forward_training;

#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_forward::primitive_desc fwd_pd(eng, prop, alg, src_md, any_w_md, dst_md,
                                                   strides, pad_l, pad_r, attr);
#else
  dnnl::convolution_forward::desc fwd_desc(prop, alg, src_md, any_w_md, dst_md, strides, pad_l,
                                           pad_r);
  dnnl::convolution_forward::primitive_desc fwd_pd(fwd_desc, attr, eng);
#endif

  Entry e;
  e.built_threads = omp_get_max_threads();
  if (kind == kFwd) {
    e.user_w_md = UserWeightDesc(g, dt);
    e.prim = dnnl::convolution_forward(fwd_pd);
    e.prim_w_md = fwd_pd.weights_desc();
    e.scratch_md = fwd_pd.scratchpad_desc();
    e.impl = fwd_pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) SetReorder(&e, e.user_w_md, e.prim_w_md);
  } else if (kind == kBwdData) {
    e.user_w_md = UserWeightDesc(g, dt);
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(eng, alg, src_md, any_w_md, dst_md,
                                                       strides, pad_l, pad_r, fwd_pd, attr);
#else
    dnnl::convolution_backward_data::desc bd_desc(alg, src_md, any_w_md, dst_md, strides, pad_l,
                                                  pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(bd_desc, attr, eng, fwd_pd);
#endif
    e.prim = dnnl::convolution_backward_data(pd);
    e.prim_w_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.impl = pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) SetReorder(&e, e.user_w_md, e.prim_w_md);
  } else {
    // The kernel gradient is accumulated by oneDNN in f32, then converted to g.dw_dt.
    e.user_w_md = UserWeightDesc(g, g.dw_dt);
    auto any_dw_md = memory::desc(WeightDims(g), memory::data_type::f32, memory::format_tag::any);
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(eng, alg, src_md, any_dw_md, dst_md,
                                                          strides, pad_l, pad_r, fwd_pd, attr);
#else
    dnnl::convolution_backward_weights::desc bw_desc(alg, src_md, any_dw_md, dst_md, strides,
                                                     pad_l, pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(bw_desc, attr, eng, fwd_pd);
#endif
    e.prim = dnnl::convolution_backward_weights(pd);
    e.prim_w_md = pd.diff_weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.impl = pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) SetReorder(&e, e.prim_w_md, e.user_w_md);
  }
  return e;
}

// ---------------------------------------------------------------------------------------------
// The primitive cache: least recently used entries are dropped beyond the capacity.

struct Cache {
  std::mutex mu;
  size_t capacity = 512;
  std::list<Key> order;  // most recently used first
  std::map<Key, std::pair<std::shared_ptr<const Entry>, std::list<Key>::iterator>> entries;

  void TrimLocked() {
    while (entries.size() > capacity && !order.empty()) {
      entries.erase(order.back());
      order.pop_back();
    }
  }
};

Cache& GetCache() {
  static auto* cache = new Cache();
  return *cache;
}

// Sets the calling thread's OpenMP thread count for one scope (restored after).
class OmpThreads {
 public:
  explicit OmpThreads(int64_t n) : previous_(omp_get_max_threads()) {
    if (n > 0) omp_set_num_threads(static_cast<int>(n));
  }
  ~OmpThreads() { omp_set_num_threads(previous_); }

 private:
  int previous_;
};

// Looks up (or builds, outside the lock) the entry for one case. The caller has set the
// calling thread's OpenMP thread count to g.threads.
std::shared_ptr<const Entry> Lookup(int64_t kind, const Geometry& g) {
  Cache& cache = GetCache();
  const Key key = MakeKey(kind, g);
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.entries.find(key);
    if (it != cache.entries.end()) {
      cache.order.splice(cache.order.begin(), cache.order, it->second.second);
      return it->second.first;
    }
  }
  auto entry = std::make_shared<const Entry>(Build(kind, g));
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.entries.find(key);
  if (it != cache.entries.end()) return it->second.first;
  cache.order.push_front(key);
  cache.entries.emplace(key, std::make_pair(entry, cache.order.begin()));
  cache.TrimLocked();
  return entry;
}

// ---------------------------------------------------------------------------------------------
// The thread budget: calls running at once hold at most the usable cores' worth of OpenMP
// threads (a call asking for more than the budget runs alone).

struct Budget {
  std::mutex mu;
  std::condition_variable cv;
  int64_t capacity = 0;
  int64_t in_use = 0;
  int64_t peak = 0;
};

Budget& GetBudget() {
  static auto* budget = [] {
    auto* b = new Budget();
    cpu_set_t set;
    CPU_ZERO(&set);
    b->capacity = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    if (b->capacity < 1) b->capacity = 1;
    return b;
  }();
  return *budget;
}

class BudgetLease {
 public:
  explicit BudgetLease(int64_t threads) : threads_(threads < 1 ? 1 : threads) {
    Budget& b = GetBudget();
    std::unique_lock<std::mutex> lock(b.mu);
    b.cv.wait(lock, [&] { return b.in_use == 0 || b.in_use + threads_ <= b.capacity; });
    b.in_use += threads_;
    if (b.in_use > b.peak) b.peak = b.in_use;
  }
  ~BudgetLease() {
    Budget& b = GetBudget();
    {
      std::lock_guard<std::mutex> lock(b.mu);
      b.in_use -= threads_;
    }
    b.cv.notify_all();
  }

 private:
  int64_t threads_;
};

// ---------------------------------------------------------------------------------------------
// The FFI handlers.

bool ToDnnlType(ffi::DataType t, dnnl::memory::data_type* out) {
  if (t == ffi::DataType::F32) {
    *out = dnnl::memory::data_type::f32;
    return true;
  }
  if (t == ffi::DataType::BF16) {
    *out = dnnl::memory::data_type::bf16;
    return true;
  }
  return false;
}

struct Attrs {
  int64_t sh, sw, plh, phh, plw, phw, groups, num_threads;
};

int64_t Volume(ffi::Span<const int64_t> dims) {
  int64_t v = 1;
  for (int64_t d : dims) v *= d;
  return v;
}

// Runs one convolution pass. `act` is NHWC input (fwd, bwd_weights) or NHWC output gradient
// (bwd_data); see the file comment for the operand roles.
ffi::Error Run(int64_t kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer out,
               const Attrs& at) {
  Geometry g;
  dnnl::memory::data_type out_dt;
  if (!ToDnnlType(a.element_type(), &g.dt) || b.element_type() != a.element_type() ||
      !ToDnnlType(out.element_type(), &out_dt) ||
      (out_dt != g.dt && !(kind == kBwdWeights && out_dt == dnnl::memory::data_type::f32))) {
    return ffi::Error::InvalidArgument(
        "sdjax_onednn: operands must all be f32 or all bf16 (a bf16 kernel gradient may be f32)");
  }
  g.dw_dt = kind == kBwdWeights ? out_dt : g.dt;
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto o_dims = out.dimensions();
  if (a_dims.size() != 4 || b_dims.size() != 4 || o_dims.size() != 4) {
    return ffi::Error::InvalidArgument("sdjax_onednn: operands must have rank 4");
  }
  // Recover (x shape, kernel shape, y shape) from the operands of this pass.
  const auto& x_dims = kind == kBwdData ? o_dims : a_dims;
  const auto& w_dims = kind == kBwdWeights ? o_dims : b_dims;
  const auto& y_dims = kind == kFwd ? o_dims : (kind == kBwdData ? a_dims : b_dims);
  g.n = x_dims[0];
  g.h = x_dims[1];
  g.w = x_dims[2];
  g.c = x_dims[3];
  g.kh = w_dims[0];
  g.kw = w_dims[1];
  g.o = w_dims[3];
  g.ho = y_dims[1];
  g.wo = y_dims[2];
  g.sh = at.sh;
  g.sw = at.sw;
  g.plh = at.plh;
  g.phh = at.phh;
  g.plw = at.plw;
  g.phw = at.phw;
  g.groups = at.groups;
  const std::string bad = CheckGeometry(g);
  if (!bad.empty()) {
    return ffi::Error::InvalidArgument("sdjax_onednn: inconsistent operand shapes: " + bad);
  }
  if (w_dims[2] * g.groups != g.c || y_dims[0] != g.n || y_dims[3] != g.o) {
    return ffi::Error::InvalidArgument(
        "sdjax_onednn: inconsistent operand shapes: batch or channel counts differ");
  }
  if (Volume(a_dims) == 0 || Volume(b_dims) == 0 || Volume(o_dims) == 0) {
    if (out.size_bytes() > 0) std::memset(out.untyped_data(), 0, out.size_bytes());
    return ffi::Error::Success();
  }
  OmpThreads omp_threads(at.num_threads);
  g.threads = omp_get_max_threads();
  try {
    auto entry = Lookup(kind, g);
    BudgetLease lease(g.threads);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    dnnl::memory scratch(entry->scratch_md, eng);
    auto x_md = ActivationDesc(g.n, g.c, g.h, g.w, g.dt);
    auto y_md = ActivationDesc(g.n, g.o, g.ho, g.wo, g.dt);
    auto reorder = [&](const dnnl::memory& from, const dnnl::memory& to) {
      dnnl::memory reorder_scratch(entry->reorder_scratch_md, eng);
      entry->reorder.execute(stream, {{DNNL_ARG_FROM, from},
                                      {DNNL_ARG_TO, to},
                                      {DNNL_ARG_SCRATCHPAD, reorder_scratch}});
    };
    if (kind == kFwd || kind == kBwdData) {
      dnnl::memory act(kind == kFwd ? x_md : y_md, eng, a.untyped_data());
      dnnl::memory res(kind == kFwd ? y_md : x_md, eng, out.untyped_data());
      dnnl::memory user_w(entry->user_w_md, eng, b.untyped_data());
      dnnl::memory w = user_w;
      if (entry->needs_reorder) {
        w = dnnl::memory(entry->prim_w_md, eng);
        reorder(user_w, w);
      }
      if (kind == kFwd) {
        entry->prim.execute(stream, {{DNNL_ARG_SRC, act},
                                     {DNNL_ARG_WEIGHTS, w},
                                     {DNNL_ARG_DST, res},
                                     {DNNL_ARG_SCRATCHPAD, scratch}});
      } else {
        entry->prim.execute(stream, {{DNNL_ARG_DIFF_DST, act},
                                     {DNNL_ARG_WEIGHTS, w},
                                     {DNNL_ARG_DIFF_SRC, res},
                                     {DNNL_ARG_SCRATCHPAD, scratch}});
      }
    } else {
      dnnl::memory src(x_md, eng, a.untyped_data());
      dnnl::memory diff_dst(y_md, eng, b.untyped_data());
      dnnl::memory user_dw(entry->user_w_md, eng, out.untyped_data());
      dnnl::memory dw = entry->needs_reorder ? dnnl::memory(entry->prim_w_md, eng) : user_dw;
      entry->prim.execute(stream, {{DNNL_ARG_SRC, src},
                                   {DNNL_ARG_DIFF_DST, diff_dst},
                                   {DNNL_ARG_DIFF_WEIGHTS, dw},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
      if (entry->needs_reorder) reorder(dw, user_dw);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("sdjax_onednn: oneDNN error: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("sdjax_onednn: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t sh,
                   int64_t sw, int64_t plh, int64_t phh, int64_t plw, int64_t phw, int64_t groups,
                   int64_t num_threads) {
  return Run(kFwd, x, w, *y, Attrs{sh, sw, plh, phh, plw, phw, groups, num_threads});
}

ffi::Error ConvBwdData(ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                       int64_t sh, int64_t sw, int64_t plh, int64_t phh, int64_t plw, int64_t phw,
                       int64_t groups, int64_t num_threads) {
  return Run(kBwdData, g, w, *dx, Attrs{sh, sw, plh, phh, plw, phw, groups, num_threads});
}

ffi::Error ConvBwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dw,
                          int64_t sh, int64_t sw, int64_t plh, int64_t phh, int64_t plw,
                          int64_t phw, int64_t groups, int64_t num_threads) {
  return Run(kBwdWeights, x, g, *dw, Attrs{sh, sw, plh, phh, plw, phw, groups, num_threads});
}

#define SDJAX_ONEDNN_BIND                 \
  ffi::Ffi::Bind()                        \
      .Arg<ffi::AnyBuffer>()              \
      .Arg<ffi::AnyBuffer>()              \
      .Ret<ffi::AnyBuffer>()              \
      .Attr<int64_t>("stride_h")          \
      .Attr<int64_t>("stride_w")          \
      .Attr<int64_t>("pad_lo_h")          \
      .Attr<int64_t>("pad_hi_h")          \
      .Attr<int64_t>("pad_lo_w")          \
      .Attr<int64_t>("pad_hi_w")          \
      .Attr<int64_t>("groups")            \
      .Attr<int64_t>("num_threads")

void CopyText(const std::string& text, char* buf, int len) {
  if (len > 0) {
    std::strncpy(buf, text.c_str(), static_cast<size_t>(len - 1));
    buf[len - 1] = '\0';
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_fwd, ConvFwd, SDJAX_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_bwd_data, ConvBwdData, SDJAX_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_bwd_weights, ConvBwdWeights, SDJAX_ONEDNN_BIND);

// Writes the oneDNN implementation name for one case into `buf` (NUL-terminated, truncated to
// `len`). `geom` holds n, c, h, w, o, kh, kw, ho, wo, sh, sw, plh, phh, plw, phw, groups;
// `kind` is 0 (fwd), 1 (bwd_data) or 2 (bwd_weights); `bf16` selects bf16 instead of f32;
// `threads` is the OpenMP thread count to build with (<= 0: the calling thread's), so the
// entry is the one a call with that `num_threads` uses. Returns 0 on success, -1 when the case
// is invalid or oneDNN cannot build the primitive (message in `buf`).
extern "C" int sdjax_onednn_impl_info(int kind, int bf16, const int64_t* geom, int threads,
                                      char* buf, int len) {
  const auto dt = bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  Geometry g{geom[0],  geom[1],  geom[2],  geom[3],  geom[4],  geom[5],
             geom[6],  geom[7],  geom[8],  geom[9],  geom[10], geom[11],
             geom[12], geom[13], geom[14], geom[15], dt,       dt,
             0};
  if (kind < kFwd || kind > kBwdWeights) {
    CopyText("kind must be 0, 1 or 2", buf, len);
    return -1;
  }
  std::string bad = CheckGeometry(g);
  if (bad.empty() && g.n < 1) bad = "the batch must be positive";
  if (!bad.empty()) {
    CopyText("invalid case: " + bad, buf, len);
    return -1;
  }
  OmpThreads omp_threads(threads);
  g.threads = omp_get_max_threads();
  std::string text;
  int rc = 0;
  try {
    text = Lookup(kind, g)->impl;
  } catch (const std::exception& err) {
    text = err.what();
    rc = -1;
  }
  CopyText(text, buf, len);
  return rc;
}

// Writes up to `len` values: cache size, cache capacity, thread budget, threads in use, peak
// threads in use, then the OpenMP thread count each cached entry was built with (most
// recently used first). Returns how many values there are in all.
extern "C" int64_t sdjax_onednn_stats(int64_t* out, int64_t len) {
  std::vector<int64_t> values;
  Cache& cache = GetCache();
  Budget& budget = GetBudget();
  {
    std::lock_guard<std::mutex> lock(budget.mu);
    std::lock_guard<std::mutex> cache_lock(cache.mu);
    values = {static_cast<int64_t>(cache.entries.size()), static_cast<int64_t>(cache.capacity),
              budget.capacity, budget.in_use, budget.peak};
    for (const Key& key : cache.order) values.push_back(cache.entries.at(key).first->built_threads);
  }
  for (int64_t i = 0; i < len && i < static_cast<int64_t>(values.size()); ++i) out[i] = values[i];
  return static_cast<int64_t>(values.size());
}

// Sets the primitive cache's capacity (at least 1), dropping least recently used entries.
extern "C" void sdjax_onednn_set_cache_capacity(int64_t capacity) {
  Cache& cache = GetCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.capacity = capacity < 1 ? 1 : static_cast<size_t>(capacity);
  cache.TrimLocked();
}

// The oneDNN version the library runs (major * 10000 + minor * 100 + patch), and the one the
// handlers were compiled against, in `compiled`.
extern "C" int64_t sdjax_onednn_version(int64_t* compiled) {
  if (compiled != nullptr) {
    *compiled = DNNL_VERSION_MAJOR * 10000 + DNNL_VERSION_MINOR * 100 + DNNL_VERSION_PATCH;
  }
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
