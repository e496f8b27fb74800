"""beit_kernels.tuning: the table of tile and switch choices, its overrides, and the choices the launchers read."""

import pytest
import torch

from beit_kernels import tuning


def test_override_sets_fields_for_the_block_and_restores_them_on_an_exception():
    default = tuning.get("layer_norm.bwd")
    with pytest.raises(RuntimeError, match="inside"):
        with tuning.override({"layer_norm.bwd": {"loop_stages": None}, "attention.bwd_fused": True}):
            assert tuning.get("layer_norm.bwd") == dict(default, loop_stages=None)
            assert tuning.get("attention.bwd_fused") is True
            with tuning.override({"layer_norm.bwd": {"programs_per_sm": 2}}):  # nested: on top of the outer one
                assert tuning.get("layer_norm.bwd") == dict(default, loop_stages=None, programs_per_sm=2)
            assert tuning.get("layer_norm.bwd")["programs_per_sm"] == default["programs_per_sm"]
            raise RuntimeError("inside")
    assert tuning.overrides() == {} and tuning.get("layer_norm.bwd") == default


@pytest.mark.parametrize(
    "entries, error, match",
    [
        ({"attention.bwd": "fused"}, ValueError, "unknown key 'attention.bwd'"),
        ({"layer_norm.bwd": {"stages": 2}}, ValueError, "has no field 'stages'"),
        ({"bias_gelu.fwd": {"BLOCK_D": 100}}, ValueError, "must be a power of two"),
        ({"attention.fused": {"DKDV_T": 1}}, ValueError, "must be a bool"),
        ({"attention.dkdv_all_queries": "yes"}, ValueError, "True, False or None"),
        ({"patch_embed.bwd": {"weight_grad": "cudnn"}}, ValueError, "'triton' or 'cublas'"),
        ({"attention.fwd": (64, 32)}, TypeError, "takes a dict"),
        ([("attention.bwd_fused", True)], TypeError, "takes a dict"),
    ],
)
def test_override_refuses_unknown_keys_and_malformed_values_before_any_change(entries, error, match):
    with pytest.raises(error, match=match):
        with tuning.override({"attention.bwd_fused": True, **entries} if isinstance(entries, dict) else entries):
            pass
    assert tuning.overrides() == {}


def test_attention_tile_override_applies_after_the_rows():
    base = tuning.attention_tile("fwd", 64, torch.bfloat16, 227 * 1024)
    with tuning.override({"attention.fwd": {"BLOCK_N": 64, "num_stages": 1}}):
        assert tuning.attention_tile("fwd", 64, torch.bfloat16, 227 * 1024) == dict(base, BLOCK_N=64, num_stages=1)
    assert tuning.attention_tile("fwd", 64, torch.bfloat16, 227 * 1024) == base


def test_attention_backward_follows_the_switches():
    cpu = torch.device("cpu")  # the interpreter: unbounded shared memory, no sm90 default
    with tuning.override({"attention.dkdv_all_queries": None, "attention.bwd_fused": False}):
        assert tuning.attention_backward(197, 64, torch.bfloat16, cpu) == "dkdv"
        with tuning.override({"attention.dkdv_all_queries": True}):
            assert tuning.attention_backward(197, 64, torch.bfloat16, cpu) == "dkdv_allq"
            assert tuning.attention_backward(197, 64, torch.float32, cpu) == "dkdv"
            with tuning.override({"attention.bwd_fused": True}):
                assert tuning.attention_backward(197, 64, torch.bfloat16, cpu) == "fused"
                assert tuning.attention_backward(257, 64, torch.bfloat16, cpu) == "dkdv"
                with tuning.override({"shared_memory": 99 * 1024}):  # an sm86: the fused backward does not fit
                    assert tuning.attention_backward(197, 64, torch.bfloat16, cpu) == "dkdv_allq"


def test_glue_tiles_follow_their_entries():
    assert tuning.layer_norm_tile(768, backward=True) == (1, 1024, 4)
    assert tuning.layer_norm_tile(768, backward=False) == (4, 1024, 8)
    assert tuning.bias_gelu_tile(3072, backward=True) == (16, 256, 8)
    assert tuning.bias_gelu_tile(40, backward=False) == (64, 64, 8)  # narrowed: more rows a program
    assert tuning.conv_epilogue_tile(256, pool=True) == (32, 128, 8)
    assert tuning.cross_entropy_chunk(19200, 8192) == 8192
    entries = {"layer_norm.bwd": {"BLOCK_M": 2, "num_warps": 8}, "linear_cross_entropy.ce": {"chunk_rows": 4}}
    with tuning.override(entries):
        assert tuning.layer_norm_tile(768, backward=True) == (2, 1024, 8)
        assert tuning.cross_entropy_chunk(19200, 8192) == 4


def test_lookups_follow_overrides_entered_after_they_were_cached():
    """The launchers' lookups are resolved once while the overrides in force stay the same; entering or leaving an
    override block must show at the next lookup, and ``get`` hands out copies."""
    assert tuning.masked_gather_warps(1024) == 4 and tuning.layer_norm_tile(768, backward=True) == (1, 1024, 4)
    with tuning.override({"masked_gather.rows": {"num_warps": {65536: 2}}, "layer_norm.bwd": {"BLOCK_M": 2}}):
        assert tuning.masked_gather_warps(1024) == 2 and tuning.layer_norm_tile(768, backward=True)[0] == 2
    assert tuning.masked_gather_warps(1024) == 4 and tuning.layer_norm_tile(768, backward=True) == (1, 1024, 4)
    for key in ("patch_embed.fwd", "masked_gather.rows", "attention.interpreter", "attention.fwd"):
        got = tuning.get(key)
        got.clear()  # a caller may change its copy
        assert tuning.get(key) != {} or key == "attention.fwd", key
    tuning.get("masked_gather.rows")["num_warps"][1024] = 32  # nested: a deep copy
    assert tuning.masked_gather_warps(1024) == 4
    with tuning.override({"attention.fwd": {"BLOCK_N": 16}}):
        cfg = tuning.get("attention.fwd")
        cfg["BLOCK_N"] = 8
        assert tuning.get("attention.fwd") == {"BLOCK_N": 16}
