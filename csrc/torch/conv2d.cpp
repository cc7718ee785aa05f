// CPU implementations of the quant::conv2d_* ops: argument checks and tensor plumbing around qk::conv2d
// (csrc/core/conv2d.h), which runs its phases over torch's thread pool, and the prepared weights it reuses.
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../core/conv2d.h"
#include "common.h"

namespace qk_torch {
namespace {

qk::Parallel torch_parallel() {
  qk::Parallel parallel;
  parallel.num_threads = at::get_num_threads();
  parallel.for_range = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, 1, body);
  };
  return parallel;
}

// kernel_size, stride and (if given) dilation: two positive ints; padding: two non-negative ints.
void check_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    c10::optional<at::IntArrayRef> dilation) {
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, "kernel_size: got ",
                    kernel_size, ", expected two positive ints");
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "stride: got ", stride,
                    ", expected two positive ints");
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding: got ", padding,
                    ", expected two non-negative ints");
  if (dilation.has_value())
    TORCH_CHECK_VALUE(dilation->size() == 2 && (*dilation)[0] > 0 && (*dilation)[1] > 0, "dilation: got ", *dilation,
                      ", expected two positive ints");
}

qk::Conv2dShape conv_shape(int64_t in_channels, int64_t out_channels, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           int64_t batch = 0, int64_t height = 0, int64_t width = 0) {
  qk::Conv2dShape s;
  s.batch = batch;
  s.in_channels = in_channels;
  s.height = height;
  s.width = width;
  s.out_channels = out_channels;
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.groups = groups;
  return s;
}

// One tensor as it was when a prepared weight was built from it (see PreparedWeights).
class TensorIdentity {
 public:
  static bool trackable(const at::Tensor& t) { return !t.is_inference() && t.is_contiguous(); }

  explicit TensorIdentity(const at::Tensor& t)
      : impl_(t.getIntrusivePtr()), data_(t.data_ptr()), version_(t._version()), sample_(sample(t)) {}

  bool expired() const { return impl_.expired(); }
  bool is(const at::Tensor& t) const { return impl_._unsafe_get_target() == t.unsafeGetTensorImpl(); }
  bool matches(const at::Tensor& t) const {
    return !expired() && is(t) && t.data_ptr() == data_ && t._version() == version_ && sample(t) == sample_;
  }

 private:
  // A hash of 64 words spread over the tensor's bytes (all of them for a small tensor): a few cache lines.
  static uint64_t sample(const at::Tensor& t) {
    const auto* bytes = static_cast<const uint8_t*>(t.data_ptr());
    const int64_t n = t.numel() * t.element_size(), words = n / 8, picks = std::min<int64_t>(words, 64);
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the picked words, then the bytes past the last word
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    for (int64_t i = 0; i < picks; ++i) {
      uint64_t v;
      std::memcpy(&v, bytes + i * words / picks * 8, 8);
      mix(v);
    }
    for (int64_t i = words * 8; i < n; ++i) mix(bytes[i]);
    return h;
  }

  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl_;
  const void* data_;
  int64_t version_;
  uint64_t sample_;
};

// Prepared weights (qk::PreparedConvWeight: reordered K, packed or planar rows for the int8 tile kernels), one per
// weight tensor and configuration, built on the first call (or by prepack_conv2d when a module loads its weight)
// and reused while the tensors live unchanged. A tensor is the same weight while its TensorImpl is alive, its data
// pointer is the same, its version counter has not moved (any in-place write moves it) and a sample of its bytes
// reads the same (a write through .data does not move the counter). Inference tensors have no version counter,
// and a weight whose preparation holds no memory costs nothing to prepare: both are prepared per call. Entries
// of weights that are gone are dropped by a sweep every kSweepCalls calls and whenever the dead ones may have
// grown to a quarter of those alive.
class PreparedWeights {
 public:
  struct Key {
    int64_t kernel_h, kernel_w, groups;
    qk::Isa isa;
    bool quantize_input, planar;
    bool operator==(const Key& o) const {
      return kernel_h == o.kernel_h && kernel_w == o.kernel_w && groups == o.groups && isa == o.isa &&
             quantize_input == o.quantize_input && planar == o.planar;
    }
  };

  struct Entry {
    std::vector<TensorIdentity> tensors;  // qweight, scale, zero point (if any)
    Key key;
    at::Tensor memory;
    qk::PreparedConvWeight prepared;
  };

  static PreparedWeights& instance() {
    static PreparedWeights* cache = new PreparedWeights();  // never destroyed: calls may come during exit
    return *cache;
  }

  // The prepared weight of w (bound from these tensors) for this configuration, or nullptr where the tensors
  // cannot be tracked or nothing would be held; builds it if there is none yet.
  std::shared_ptr<const Entry> get(const qk::Conv2dShape& s, qk::Layout layout, const BoundWeight& w,
                                   const at::Tensor& qweight, const at::Tensor& scale,
                                   const c10::optional<at::Tensor>& zero_point, bool quantize_input) {
    std::vector<const at::Tensor*> tensors{&qweight, &scale};
    if (zero_point.has_value()) tensors.push_back(&*zero_point);
    for (const at::Tensor* t : tensors)
      if (!TensorIdentity::trackable(*t)) return nullptr;
    const qk::Isa isa = qk::active_isa();
    const int64_t bytes = qk::prepared_conv_weight_bytes(isa, s, w.view, layout, quantize_input);
    if (bytes == 0) return nullptr;
    const Key key{s.kernel_h, s.kernel_w, s.groups, isa, quantize_input,
                  qk::conv_runs_planar(isa, s, w.view, layout, quantize_input)};
    std::lock_guard<std::mutex> lock(mutex_);
    if (++calls_ % kSweepCalls == 0) purge();
    auto& list = entries_[qweight.unsafeGetTensorImpl()];
    for (auto it = list.begin(); it != list.end(); ++it) {
      const Entry& e = **it;
      if (!(e.key == key)) continue;
      bool current = e.tensors.size() == tensors.size();
      for (size_t i = 0; current && i < tensors.size(); ++i) current = e.tensors[i].matches(*tensors[i]);
      if (current) return *it;
      list.erase(it);  // its tensors were written or replaced since: built afresh below
      --count_;
      break;
    }
    auto e = std::make_shared<Entry>();
    for (const at::Tensor* t : tensors) e->tensors.emplace_back(*t);
    e->key = key;
    e->memory = at::empty({bytes}, qweight.options().dtype(at::kByte));
    e->prepared = qk::prepare_conv_weight(isa, s, w.view, layout, quantize_input, e->memory.data_ptr<uint8_t>(),
                                          torch_parallel());
    list.push_back(e);
    if (++count_ > live_after_purge_ + live_after_purge_ / 4) purge();
    return e;
  }

  // (count, bytes) of the entries whose weight is alive.
  std::pair<int64_t, int64_t> live() {
    std::lock_guard<std::mutex> lock(mutex_);
    purge();
    int64_t bytes = 0;
    for (const auto& [impl, list] : entries_)
      for (const auto& e : list) bytes += e->memory.numel();
    return {count_, bytes};
  }

 private:
  static constexpr int64_t kSweepCalls = 256;

  // Drops the entries of weights that are gone.
  void purge() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      auto& list = it->second;
      const size_t before = list.size();
      list.erase(std::remove_if(list.begin(), list.end(), [](const auto& e) { return e->tensors.front().expired(); }),
                 list.end());
      count_ -= static_cast<int64_t>(before - list.size());
      it = list.empty() ? entries_.erase(it) : std::next(it);
    }
    live_after_purge_ = std::max<int64_t>(count_, 64);
  }

  std::mutex mutex_;
  // By the qweight's TensorImpl: a live entry's weak reference keeps that address from being reused.
  std::unordered_map<const c10::TensorImpl*, std::vector<std::shared_ptr<const Entry>>> entries_;
  int64_t count_ = 0, live_after_purge_ = 64, calls_ = 0;
};

at::Tensor conv2d_impl(int bits, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  check_activation(x);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: got shape ", shape_str(x), ", expected (batch, channels, height, width)");
  TORCH_CHECK_VALUE(x.size(1) > 0, "x: got in_channels=0, expected at least 1");
  check_geometry(kernel_size, stride, padding, dilation);
  const int64_t c = x.size(1), cout = qweight.dim() > 0 ? qweight.size(0) : 0;
  TORCH_CHECK_VALUE(groups > 0 && c % groups == 0 && cout % groups == 0, "groups: got ", groups,
                    ", expected a positive divisor of in_channels=", c, " and out_channels=", cout);
  const int64_t k = c / groups * kernel_size[0] * kernel_size[1];
  BoundWeight w(check_weight(bits, k, qweight, scale, zero_point, x.device()), qweight, scale, zero_point);
  check_bias(bias, cout, x.device());
  const int64_t batch = x.size(0), h = x.size(2), wd = x.size(3);
  const qk::Conv2dShape shape = conv_shape(c, cout, kernel_size, stride, padding, dilation, groups, batch, h, wd);
  const int64_t oh = shape.out_height(), ow = shape.out_width();
  TORCH_CHECK_VALUE(oh > 0 && ow > 0, "x: got spatial size ", h, "x", wd, ", too small for kernel_size ",
                    kernel_size, " with padding ", padding, " and dilation ", dilation);
  // The core reads and writes float32: other dtypes are converted on the way in and out.
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (batch == 0) return at::empty({0, cout, oh, ow}, x.options().memory_format(memory_format));
  at::Tensor xf = x.to(at::kFloat).contiguous(memory_format);
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  if (!quantize_input && !shape.depthwise() && batch * oh * ow >= kFloatGemmMinRows) {
    // Weight-only over many output pixels: torch's float conv on the weight dequantized per call, for the
    // reason linear_by_panels exists (common.h). A conv's weight is small beside its activations, so its
    // decode is cheap. Depthwise convs stay on the direct kernel, which beats the float conv.
    at::Tensor wf = at::empty({cout, c / groups, kernel_size[0], kernel_size[1]}, xf.options());
    const auto& kern = qk::active_kernels();
    parallel_over_rows(cout, [&](int64_t b, int64_t e) {
      kern.dequantize_rows(w.view, b, e, wf.data_ptr<float>() + b * k);
    });
    at::Tensor y = at::conv2d(xf, wf, bias_f.defined() ? c10::optional<at::Tensor>(bias_f) : c10::nullopt, stride,
                              padding, dilation, groups);
    return y.contiguous(memory_format).to(x.scalar_type());
  }

  const auto layout = channels_last ? qk::Layout::nhwc : qk::Layout::nchw;
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto prepared = PreparedWeights::instance().get(shape, layout, w, qweight, scale, zero_point, quantize_input);
  at::Tensor out = at::empty({batch, cout, oh, ow}, x.options().dtype(at::kFloat).memory_format(memory_format));
  if (prepared)
    qk::conv2d(prepared->key.isa, shape, layout, xf.data_ptr<float>(), prepared->prepared, bias_ptr, quantize_input,
               out.data_ptr<float>(), torch_parallel());
  else
    qk::conv2d(qk::active_isa(), shape, layout, xf.data_ptr<float>(), w.view, bias_ptr, quantize_input,
               out.data_ptr<float>(), torch_parallel());
  return out.to(x.scalar_type());
}

at::Tensor conv2d_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  return conv2d_impl(8, x, qweight, scale, c10::nullopt, bias, kernel_size, stride, padding, dilation, groups,
                     quantize_input);
}
at::Tensor conv2d_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  return conv2d_impl(4, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
                     quantize_input);
}

}  // namespace

int64_t prepack_conv2d(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                       int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, int64_t groups, bool quantize_input, bool channels_last) {
  check_geometry(kernel_size, stride, padding, c10::nullopt);
  const int64_t cout = qweight.dim() > 0 ? qweight.size(0) : 0;
  TORCH_CHECK_VALUE(in_channels > 0 && groups > 0 && in_channels % groups == 0 && cout % groups == 0, "groups: got ",
                    groups, ", expected a positive divisor of in_channels=", in_channels, " and out_channels=", cout);
  const int bits = qweight.scalar_type() == at::kByte ? 4 : 8;
  const int64_t k = in_channels / groups * kernel_size[0] * kernel_size[1];
  const qk::WeightView view = check_weight(bits, k, qweight, scale, zero_point, qweight.device());
  if (!qweight.device().is_cpu()) return 0;  // the CUDA kernels read the stored weight
  BoundWeight w(view, qweight, scale, zero_point);
  const qk::Conv2dShape shape = conv_shape(in_channels, cout, kernel_size, stride, padding, {1, 1}, groups);
  const auto layout = channels_last ? qk::Layout::nhwc : qk::Layout::nchw;
  const auto prepared =
      PreparedWeights::instance().get(shape, layout, w, qweight, scale, zero_point, quantize_input);
  return prepared ? prepared->memory.numel() : 0;
}

std::pair<int64_t, int64_t> prepacked_conv2d_weights() { return PreparedWeights::instance().live(); }

}  // namespace qk_torch

TORCH_LIBRARY_IMPL(quant, CPU, m) {
  m.impl("conv2d_int8", &qk_torch::conv2d_int8);
  m.impl("conv2d_int4", &qk_torch::conv2d_int4);
}
