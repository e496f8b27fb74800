"""FLOP counts against the published and independently derived figures (../shared/reference/perf_anchors.md)."""

import pytest
import torch

from beit.flops import (
    dalle_encoder_macs,
    encoder_macs_per_image,
    peak_flops,
    tokenizer_flops_per_image,
    train_flops_per_image,
)
from beit.model import BeitConfig


def test_beit_base_macs_match_timm_and_the_derivation():
    cfg = BeitConfig()
    assert encoder_macs_per_image(cfg, 0) / 1e9 == pytest.approx(17.56, abs=0.01)  # timm's 17.58 GMAC, no head
    assert encoder_macs_per_image(cfg, 75) / 1e9 == pytest.approx(18.03, abs=0.01)  # + the MIM head on 75 rows
    assert train_flops_per_image(cfg, 75) / 1e9 == pytest.approx(108.2, abs=0.1)


def test_dalle_encoder_macs():
    assert dalle_encoder_macs(112) / 1e9 == pytest.approx(26.06, abs=0.01)
    assert dalle_encoder_macs(224) == pytest.approx(4 * dalle_encoder_macs(112))
    # The output convolution (2048 -> 8192 at 14 x 14) on the 75 masked positions only.
    assert dalle_encoder_macs(112, num_positions=196) == dalle_encoder_macs(112)
    assert dalle_encoder_macs(112) - dalle_encoder_macs(112, num_positions=75) == (196 - 75) * 2048 * 8192
    with pytest.raises(TypeError, match="num_positions"):
        dalle_encoder_macs(112, num_positions=torch.zeros(2, 75))  # the index itself, not its width


def test_no_peak_on_cpu():
    assert peak_flops("cpu") is None


def test_tokenizer_flops_follow_the_encoder_it_is_given():
    from beit.tokenizer.dalle import DalleEncoder
    from beit.tokenizer.kmeans import KMeansTokenizer

    small = DalleEncoder(n_hid=64, vocab_size=512)
    assert tokenizer_flops_per_image(small, 112) == 2 * dalle_encoder_macs(112, 64, 512)
    assert tokenizer_flops_per_image(small, 112) < 2 * dalle_encoder_macs(112) / 10
    kmeans = KMeansTokenizer(torch.rand(16, 3 * 8 * 8), patch_size=8, input_size=32)
    assert tokenizer_flops_per_image(kmeans, 32) == 0.0
