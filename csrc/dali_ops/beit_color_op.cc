// BeitColorNormalize: a DALI CPU operator that fuses the BEiT colour jitter, the horizontal flip and the output
// normalisation of one view into a single pass over the pixels.
//
// Per sample, on a uint8 HWC RGB image with factors c, b, s and a contrast centre m (the image's mean grey level):
//   x <- clip(m + c (x - m))          contrast    (PIL ImageEnhance.Contrast, as torchvision's ColorJitter)
//   x <- clip(b x)                    brightness  (ImageEnhance.Brightness)
//   x <- clip(g + s (x - g))          saturation  (ImageEnhance.Color; g = 0.299 R + 0.587 G + 0.114 B)
// clip() is to [0, 255] after each step as PIL's uint8 images are. Then, mirrored when `mirror` is set:
//   dtype uint8:            HWC uint8, rounded
//   dtype float / float16:  CHW, (x / 255 - mean[c]) / std[c]
// DALI's own operators do the same in four passes (brightness_contrast, hsv, crop_mirror_normalize and a
// conversion), which costs about three times as much on the CPU; the GPU pipeline keeps those.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dali/core/float16.h"
#include "dali/pipeline/operator/operator.h"

namespace beit {

namespace {

inline float Clip255(float v) { return std::min(255.f, std::max(0.f, v)); }

struct Jitter {
  float contrast, brightness, saturation, center;

  // One pixel through the three steps, in place.
  inline void Apply(float &r, float &g, float &b) const {
    r = Clip255(center + contrast * (r - center));
    g = Clip255(center + contrast * (g - center));
    b = Clip255(center + contrast * (b - center));
    r = Clip255(brightness * r);
    g = Clip255(brightness * g);
    b = Clip255(brightness * b);
    float gray = 0.299f * r + 0.587f * g + 0.114f * b;
    r = Clip255(gray + saturation * (r - gray));
    g = Clip255(gray + saturation * (g - gray));
    b = Clip255(gray + saturation * (b - gray));
  }
};

}  // namespace

class BeitColorNormalize : public ::dali::Operator<::dali::CPUBackend> {
 public:
  explicit BeitColorNormalize(const ::dali::OpSpec &spec) : ::dali::Operator<::dali::CPUBackend>(spec) {
    dtype_ = spec.GetArgument<::dali::DALIDataType>("dtype");
    DALI_ENFORCE(dtype_ == DALI_FLOAT || dtype_ == DALI_FLOAT16 || dtype_ == DALI_UINT8,
                 "dtype must be FLOAT, FLOAT16 or UINT8");
    auto mean = spec.GetRepeatedArgument<float>("mean");
    auto stddev = spec.GetRepeatedArgument<float>("std");
    DALI_ENFORCE(mean.size() == 3 && stddev.size() == 3, "mean and std need 3 values");
    for (int c = 0; c < 3; ++c) {
      DALI_ENFORCE(stddev[c] != 0.f, "std must be non-zero");
      scale_[c] = 1.f / (255.f * stddev[c]);
      bias_[c] = -mean[c] / stddev[c];
    }
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &input = ws.Input<::dali::CPUBackend>(0);
    int nsamples = input.num_samples();
    DALI_ENFORCE(input.type() == DALI_UINT8, "BeitColorNormalize expects uint8 images");
    ::dali::GetPerSampleArgument<float>(brightness_, "brightness", spec_, ws, nsamples);
    ::dali::GetPerSampleArgument<float>(contrast_, "contrast", spec_, ws, nsamples);
    ::dali::GetPerSampleArgument<float>(saturation_, "saturation", spec_, ws, nsamples);
    ::dali::GetPerSampleArgument<float>(center_, "contrast_center", spec_, ws, nsamples);
    ::dali::GetPerSampleArgument<int>(mirror_, "mirror", spec_, ws, nsamples);
    ::dali::TensorListShape<> shape(nsamples, 3);
    for (int i = 0; i < nsamples; ++i) {
      auto in = input.tensor_shape(i);
      DALI_ENFORCE(in.size() == 3 && in[2] == 3, "BeitColorNormalize expects HWC images with 3 channels");
      if (dtype_ == DALI_UINT8)
        shape.set_tensor_shape(i, {in[0], in[1], 3});
      else
        shape.set_tensor_shape(i, {3, in[0], in[1]});
    }
    output_desc.resize(1);
    output_desc[0] = {shape, dtype_};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &input = ws.Input<::dali::CPUBackend>(0);
    auto &output = ws.Output<::dali::CPUBackend>(0);
    output.SetLayout(dtype_ == DALI_UINT8 ? "HWC" : "CHW");
    auto &pool = ws.GetThreadPool();
    for (int i = 0; i < input.num_samples(); ++i) {
      pool.AddWork([&, i](int) {
        auto shape = input.tensor_shape(i);
        int h = shape[0], w = shape[1];
        const uint8_t *in = input.tensor<uint8_t>(i);
        Jitter jitter{contrast_[i], brightness_[i], saturation_[i], center_[i]};
        if (dtype_ == DALI_UINT8)
          Process(in, output.mutable_tensor<uint8_t>(i), h, w, jitter, mirror_[i] != 0);
        else if (dtype_ == DALI_FLOAT16)
          Process(in, output.mutable_tensor<::dali::float16>(i), h, w, jitter, mirror_[i] != 0);
        else
          Process(in, output.mutable_tensor<float>(i), h, w, jitter, mirror_[i] != 0);
      });
    }
    pool.RunAll();
  }

 private:
  template <typename Out>
  void Process(const uint8_t *in, Out *out, int h, int w, const Jitter &jitter, bool mirror) const {
    const int64_t plane = static_cast<int64_t>(h) * w;
    for (int y = 0; y < h; ++y) {
      const uint8_t *row = in + static_cast<int64_t>(y) * w * 3;
      for (int x = 0; x < w; ++x) {
        float r = row[3 * x], g = row[3 * x + 1], b = row[3 * x + 2];
        jitter.Apply(r, g, b);
        int64_t ox = static_cast<int64_t>(y) * w + (mirror ? w - 1 - x : x);
        if constexpr (std::is_same_v<Out, uint8_t>) {
          out[3 * ox] = static_cast<uint8_t>(std::lround(r));
          out[3 * ox + 1] = static_cast<uint8_t>(std::lround(g));
          out[3 * ox + 2] = static_cast<uint8_t>(std::lround(b));
        } else {
          out[ox] = static_cast<Out>(r * scale_[0] + bias_[0]);
          out[plane + ox] = static_cast<Out>(g * scale_[1] + bias_[1]);
          out[2 * plane + ox] = static_cast<Out>(b * scale_[2] + bias_[2]);
        }
      }
    }
  }

  ::dali::DALIDataType dtype_;
  float scale_[3], bias_[3];
  std::vector<float> brightness_, contrast_, saturation_, center_;
  std::vector<int> mirror_;
};

}  // namespace beit

DALI_REGISTER_OPERATOR(BeitColorNormalize, ::beit::BeitColorNormalize, ::dali::CPU);

DALI_SCHEMA(BeitColorNormalize)
    .DocStr(R"(BEiT colour jitter (contrast, brightness, saturation, PIL semantics), flip and normalisation of
uint8 HWC RGB images in one pass: uint8 HWC out, or float / float16 CHW normalised with mean and std.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("brightness", "Brightness factor.", 1.f, true)
    .AddOptionalArg("contrast", "Contrast factor.", 1.f, true)
    .AddOptionalArg("saturation", "Saturation factor.", 1.f, true)
    .AddOptionalArg("contrast_center", "Mean grey level the contrast scales around, in [0, 255].", 128.f, true)
    .AddOptionalArg("mirror", "Flip horizontally when non-zero.", 0, true)
    .AddOptionalArg("mean", "Per-channel mean, in [0, 1] units.", std::vector<float>{0.f, 0.f, 0.f})
    .AddOptionalArg("std", "Per-channel standard deviation, in [0, 1] units.", std::vector<float>{1.f, 1.f, 1.f})
    .AddOptionalTypeArg("dtype", "Output type: FLOAT, FLOAT16 (CHW, normalised) or UINT8 (HWC).", DALI_FLOAT);
