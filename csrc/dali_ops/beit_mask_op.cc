// BeitMaskGenerator: a DALI CPU operator that draws BEiT blockwise masks, one per sample.
//
// The algorithm is the one in beit/masking.py (the official unilm MaskingGenerator): blocks of random area
// U(min_num_patches, max_mask) and log-uniform aspect ratio are placed until num_masking_patches cells are
// masked or ten attempts in a row fail to add a cell. Python's `random` stream cannot be reproduced here, so the
// operator has its own generator; tests compare the two statistically.
//
// Outputs per sample:
//   0: mask   [height * width] bool, row-major
//   1: index  [num_masking_patches] int64, the masked positions in ascending order, -1 padding
//
// Reproducibility: sample i of the k-th batch this operator instance produces uses an mt19937_64 seeded from
// (seed, k, i) through SplitMix64, so the output does not depend on the thread count or the scheduling order.

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace beit {

namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

struct MaskParams {
  int height, width, num_masking_patches, min_num_patches, max_num_patches;
  double log_aspect_lo, log_aspect_hi;
};

class MaskSampler {
 public:
  MaskSampler(const MaskParams &p, uint64_t seed) : p_(p), rng_(seed) {}

  // Python's random.uniform(a, b) = a + (b - a) * random(); it also accepts a > b, as _mask relies on when
  // max_mask < min_num_patches.
  double Uniform(double a, double b) { return a + (b - a) * Unit(); }

  // Python's random.randint: both bounds inclusive.
  int RandInt(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  int MaskBlock(uint8_t *mask, int max_mask) {
    int delta = 0;
    for (int attempt = 0; attempt < 10; ++attempt) {
      double target_area = Uniform(p_.min_num_patches, max_mask);
      double aspect = std::exp(Uniform(p_.log_aspect_lo, p_.log_aspect_hi));
      // nearbyint rounds half to even under the default rounding mode, as Python's round() does.
      int h = static_cast<int>(std::nearbyint(std::sqrt(target_area * aspect)));
      int w = static_cast<int>(std::nearbyint(std::sqrt(target_area / aspect)));
      if (w < p_.width && h < p_.height) {
        int top = RandInt(0, p_.height - h);
        int left = RandInt(0, p_.width - w);
        int already = 0;
        for (int i = top; i < top + h; ++i)
          for (int j = left; j < left + w; ++j) already += mask[i * p_.width + j];
        int num_new = h * w - already;
        if (num_new > 0 && num_new <= max_mask) {
          for (int i = top; i < top + h; ++i)
            for (int j = left; j < left + w; ++j) mask[i * p_.width + j] = 1;
          delta += num_new;
        }
        if (delta > 0) break;
      }
    }
    return delta;
  }

  void Sample(uint8_t *mask) {
    std::fill(mask, mask + p_.height * p_.width, 0);
    int count = 0;
    while (count < p_.num_masking_patches) {
      int max_mask = std::min(p_.num_masking_patches - count, p_.max_num_patches);
      int delta = MaskBlock(mask, max_mask);
      if (delta == 0) break;
      count += delta;
    }
  }

 private:
  double Unit() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }  // 53 random bits in [0, 1)

  MaskParams p_;
  std::mt19937_64 rng_;
};

}  // namespace

class BeitMaskGenerator : public ::dali::Operator<::dali::CPUBackend> {
 public:
  explicit BeitMaskGenerator(const ::dali::OpSpec &spec) : ::dali::Operator<::dali::CPUBackend>(spec) {
    p_.height = spec.GetArgument<int>("height");
    p_.width = spec.GetArgument<int>("width");
    p_.num_masking_patches = spec.GetArgument<int>("num_masking_patches");
    p_.min_num_patches = spec.GetArgument<int>("min_num_patches");
    int max_num_patches = spec.GetArgument<int>("max_num_patches");
    p_.max_num_patches = max_num_patches > 0 ? max_num_patches : p_.num_masking_patches;
    double min_aspect = spec.GetArgument<float>("min_aspect");
    double max_aspect = spec.GetArgument<float>("max_aspect");
    if (max_aspect <= 0) max_aspect = 1.0 / min_aspect;
    DALI_ENFORCE(p_.height > 0 && p_.width > 0, "height and width must be positive");
    DALI_ENFORCE(p_.num_masking_patches >= 0 && p_.num_masking_patches <= p_.height * p_.width,
                 "num_masking_patches must lie in [0, height * width]");
    DALI_ENFORCE(min_aspect > 0, "min_aspect must be positive");
    p_.log_aspect_lo = std::log(min_aspect);
    p_.log_aspect_hi = std::log(max_aspect);
    seed_ = static_cast<uint64_t>(spec.GetArgument<int64_t>("seed"));
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    int nsamples = ws.GetRequestedBatchSize(0);
    output_desc.resize(2);
    output_desc[0] = {::dali::uniform_list_shape(nsamples, {p_.height * p_.width}), DALI_BOOL};
    output_desc[1] = {::dali::uniform_list_shape(nsamples, {p_.num_masking_patches}), DALI_INT64};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &masks = ws.Output<::dali::CPUBackend>(0);
    auto &indices = ws.Output<::dali::CPUBackend>(1);
    int nsamples = masks.num_samples();
    uint64_t batch_key = SplitMix64(seed_ ^ SplitMix64(batch_counter_++));
    auto &pool = ws.GetThreadPool();
    for (int s = 0; s < nsamples; ++s) {
      pool.AddWork([&, s](int) {
        MaskSampler sampler(p_, SplitMix64(batch_key + static_cast<uint64_t>(s)));
        std::vector<uint8_t> cells(p_.height * p_.width);
        sampler.Sample(cells.data());
        bool *mask = masks.mutable_tensor<bool>(s);
        int64_t *index = indices.mutable_tensor<int64_t>(s);
        int k = 0;
        for (int n = 0; n < p_.height * p_.width; ++n) {
          mask[n] = cells[n] != 0;
          // The algorithm never exceeds the budget; the bound keeps a bug from writing out of range.
          if (cells[n] && k < p_.num_masking_patches) index[k++] = n;
        }
        for (; k < p_.num_masking_patches; ++k) index[k] = -1;
      });
    }
    pool.RunAll();
  }

 private:
  MaskParams p_{};
  uint64_t seed_ = 0;
  uint64_t batch_counter_ = 0;
};

}  // namespace beit

DALI_REGISTER_OPERATOR(BeitMaskGenerator, ::beit::BeitMaskGenerator, ::dali::CPU);

DALI_SCHEMA(BeitMaskGenerator)
    .DocStr(R"(BEiT blockwise masks (unilm MaskingGenerator algorithm), one per sample.

Outputs a [height * width] bool mask and a [num_masking_patches] int64 index of the masked positions
(ascending, -1 padding).)")
    .NumInput(0)
    .NumOutput(2)
    .AddOptionalArg("height", "Rows of the patch grid.", 14)
    .AddOptionalArg("width", "Columns of the patch grid.", 14)
    .AddOptionalArg("num_masking_patches", "Budget: at most this many cells are masked.", 75)
    .AddOptionalArg("min_num_patches", "Smallest block area drawn.", 16)
    .AddOptionalArg("max_num_patches", "Largest block area drawn; <= 0 means num_masking_patches.", 0)
    .AddOptionalArg("min_aspect", "Smallest block aspect ratio.", 0.3f)
    .AddOptionalArg("max_aspect", "Largest block aspect ratio; <= 0 means 1 / min_aspect.", 0.f)
    .AddRandomSeedArg();
