// XLA FFI handlers running 2-D convolutions with oneDNN (CPU, OpenMP runtime).
//
// Layouts follow sdjax.conv.conv2d: activations NHWC, kernels HWIO with
// I = C_in / groups (lax's feature_group_count grouping). Three handlers:
//   sdjax_onednn_conv_fwd:  (x, w)  -> y      forward
//   sdjax_onednn_conv_bwd_data:    (g, w)  -> dx  input gradient
//   sdjax_onednn_conv_bwd_weights: (x, g)  -> dw  kernel gradient
// Attributes (all int64): stride_h, stride_w, pad_lo_h, pad_hi_h, pad_lo_w,
// pad_hi_w (padding may be asymmetric), groups, num_threads (<= 0: OpenMP's
// default). Element types: f32, or bf16 for every operand.
//
// Activations are used in place (oneDNN's nhwc tag); kernels are reordered
// per call between HWIO and the layout the primitive picks (format any),
// which keeps oneDNN on its direct kernels. Primitives are cached per shape
// behind a mutex; execution uses a caller-owned scratchpad, so concurrent
// calls (one per CPU device) are safe.
//
// Also exports `sdjax_onednn_impl_info` (C ABI) for a host-side query of the
// implementation oneDNN picks for a case, e.g. to avoid reference kernels.

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
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
};

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t>;

Key MakeKey(int64_t kind, const Geometry& g) {
  return Key(kind, g.n, g.c, g.h, g.w, g.o, g.kh, g.kw, g.sh, g.sw, g.plh, g.phh, g.plw, g.phw,
             g.groups, static_cast<int64_t>(g.dt), 0);
}

// One cached case: the primitive, the descriptor of the kernel as the primitive wants it,
// the user's HWIO kernel descriptor, and the reorder between them (empty when identical).
struct Entry {
  dnnl::primitive prim;
  dnnl::memory::desc scratch_md;
  dnnl::memory::desc prim_w_md;
  dnnl::memory::desc user_w_md;
  dnnl::primitive reorder;  // user -> prim (fwd, bwd_data) or prim -> user (bwd_weights)
  bool needs_reorder = false;
  std::string impl;
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
    return dnnl::memory::desc(WeightDims(g), dt, dnnl::memory::dims{1, g.o, g.kw * ig * g.o, ig * g.o});
  }
  return dnnl::memory::desc(WeightDims(g), dt,
                            dnnl::memory::dims{og, 1, g.o, g.kw * ig * g.o, ig * g.o});
}

Entry Build(int64_t kind, const Geometry& g) {
  using dnnl::memory;
  auto& eng = Engine();
  const auto dt = g.dt;
  auto src_md = ActivationDesc(g.n, g.c, g.h, g.w, dt);
  auto dst_md = ActivationDesc(g.n, g.o, g.ho, g.wo, dt);
  auto any_w_md = memory::desc(WeightDims(g), dt, memory::format_tag::any);
  memory::dims strides{g.sh, g.sw}, pad_l{g.plh, g.plw}, pad_r{g.phh, g.phw};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  dnnl::convolution_forward::desc fwd_desc(dnnl::prop_kind::forward_training,
                                           dnnl::algorithm::convolution_direct, src_md, any_w_md,
                                           dst_md, strides, pad_l, pad_r);
  dnnl::convolution_forward::primitive_desc fwd_pd(fwd_desc, attr, eng);

  Entry e;
  e.user_w_md = UserWeightDesc(g, dt);
  if (kind == kFwd) {
    e.prim = dnnl::convolution_forward(fwd_pd);
    e.prim_w_md = fwd_pd.weights_desc();
    e.scratch_md = fwd_pd.scratchpad_desc();
    e.impl = fwd_pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) {
      e.reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.user_w_md, eng, e.prim_w_md));
    }
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::desc bd_desc(dnnl::algorithm::convolution_direct, src_md,
                                                  any_w_md, dst_md, strides, pad_l, pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(bd_desc, attr, eng, fwd_pd);
    e.prim = dnnl::convolution_backward_data(pd);
    e.prim_w_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.impl = pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) {
      e.reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.user_w_md, eng, e.prim_w_md));
    }
  } else {
    // The kernel gradient is accumulated and returned by oneDNN in f32, then converted.
    auto any_dw_md = memory::desc(WeightDims(g), memory::data_type::f32, memory::format_tag::any);
    dnnl::convolution_backward_weights::desc bw_desc(dnnl::algorithm::convolution_direct, src_md,
                                                     any_dw_md, dst_md, strides, pad_l, pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(bw_desc, attr, eng, fwd_pd);
    e.prim = dnnl::convolution_backward_weights(pd);
    e.prim_w_md = pd.diff_weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.impl = pd.impl_info_str();
    e.needs_reorder = e.prim_w_md != e.user_w_md;
    if (e.needs_reorder) {
      e.reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.prim_w_md, eng, e.user_w_md));
    }
  }
  return e;
}

std::mutex& CacheMutex() {
  static std::mutex mu;
  return mu;
}

std::shared_ptr<const Entry> Lookup(int64_t kind, const Geometry& g) {
  static auto* cache = new std::map<Key, std::shared_ptr<const Entry>>();
  const Key key = MakeKey(kind, g);
  {
    std::lock_guard<std::mutex> lock(CacheMutex());
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto entry = std::make_shared<const Entry>(Build(kind, g));
  std::lock_guard<std::mutex> lock(CacheMutex());
  auto inserted = cache->emplace(key, entry);
  return inserted.first->second;
}

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

// Runs one convolution pass. `act` is NHWC input (fwd, bwd_weights) or NHWC output gradient
// (bwd_data); see the file comment for the operand roles.
ffi::Error Run(int64_t kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer out,
               const Attrs& at) {
  Geometry g;
  if (!ToDnnlType(a.element_type(), &g.dt) || b.element_type() != a.element_type() ||
      out.element_type() != a.element_type()) {
    return ffi::Error::InvalidArgument("sdjax_onednn: operands must all be f32 or all bf16");
  }
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
  if (g.groups < 1 || g.c % g.groups || g.o % g.groups || w_dims[2] * g.groups != g.c ||
      y_dims[0] != g.n || y_dims[3] != g.o) {
    return ffi::Error::InvalidArgument("sdjax_onednn: inconsistent operand shapes");
  }
  if (at.num_threads > 0) omp_set_num_threads(static_cast<int>(at.num_threads));
  try {
    auto entry = Lookup(kind, g);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    dnnl::memory scratch(entry->scratch_md, eng);
    auto x_md = ActivationDesc(g.n, g.c, g.h, g.w, g.dt);
    auto y_md = ActivationDesc(g.n, g.o, g.ho, g.wo, g.dt);
    if (kind == kFwd || kind == kBwdData) {
      dnnl::memory act(kind == kFwd ? x_md : y_md, eng, a.untyped_data());
      dnnl::memory res(kind == kFwd ? y_md : x_md, eng, out.untyped_data());
      dnnl::memory user_w(entry->user_w_md, eng, b.untyped_data());
      dnnl::memory w = user_w;
      if (entry->needs_reorder) {
        w = dnnl::memory(entry->prim_w_md, eng);
        entry->reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, w}});
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
      if (entry->needs_reorder) entry->reorder.execute(stream, {{DNNL_ARG_FROM, dw}, {DNNL_ARG_TO, user_dw}});
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_fwd, ConvFwd, SDJAX_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_bwd_data, ConvBwdData, SDJAX_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(sdjax_onednn_conv_bwd_weights, ConvBwdWeights, SDJAX_ONEDNN_BIND);

// Writes the oneDNN implementation name for one case into `buf` (NUL-terminated, truncated to
// `len`). `geom` holds n, c, h, w, o, kh, kw, ho, wo, sh, sw, plh, phh, plw, phw, groups;
// `kind` is 0 (fwd), 1 (bwd_data) or 2 (bwd_weights); `bf16` selects bf16 instead of f32.
// Returns 0 on success, -1 when oneDNN cannot build the primitive (message in `buf`).
extern "C" int sdjax_onednn_impl_info(int kind, int bf16, const int64_t* geom, char* buf,
                                      int len) {
  Geometry g{geom[0],  geom[1],  geom[2],  geom[3],  geom[4],  geom[5],
             geom[6],  geom[7],  geom[8],  geom[9],  geom[10], geom[11],
             geom[12], geom[13], geom[14], geom[15],
             bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32};
  std::string text;
  int rc = 0;
  try {
    text = Lookup(kind, g)->impl;
  } catch (const std::exception& err) {
    text = err.what();
    rc = -1;
  }
  if (len > 0) {
    std::strncpy(buf, text.c_str(), static_cast<size_t>(len - 1));
    buf[len - 1] = '\0';
  }
  return rc;
}
