"""A tiny CPU run of bench/finetune_throughput.py, so the fine-tuning step's benchmark cannot rot between GPU runs."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))

import finetune_throughput  # noqa: E402

RECORDED = ("kernel", "provider", "mode", "metric", "unit", "shape", "dtype", "device", "torch", "triton", "git_sha",
            "date")  # fmt: skip
IMPLS = ("ref", "sdpa", "triton", "triton+graph")


def test_quick_run_rows(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU smoke run needs the Triton interpreter")
    out = tmp_path / "finetune.json"
    # One tiny shape, one timed step and no warm-up (the graph variant still warms up once, then runs its captured
    # code eagerly on the CPU).
    rows = finetune_throughput.main(["--quick", "--impls", ",".join(IMPLS), "--image-size", "32", "--steps", "1",
                                     "--warmup", "0",
                                     "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    errors = [r for r in rows if r["metric"] == "error"]
    assert not errors, errors
    for r in rows:
        for key in RECORDED:
            assert r.get(key) not in (None, ""), (key, r)
        assert r["shape"]["image"] == 32 and r["shape"]["tokens"] == 5 and r["shape"]["classes"] == 1000
    for impl in IMPLS:
        ips = [r for r in rows if r["provider"] == impl and r["metric"] == "throughput"]
        assert len(ips) == 1 and ips[0]["p50"] > 0, impl
        metrics = {r["metric"] for r in rows if r["provider"] == impl}
        phases = {"forward_time", "backward_time", "optimizer_time"}
        assert phases <= metrics if impl != "triton+graph" else "step_time" in metrics, (impl, metrics)
    # Each triton variant against the best of what ran of sdpa and compile, in the same run.
    ratios = {r["provider"]: r for r in rows if r["metric"] == "speedup_vs_best_sdpa_compile"}
    assert set(ratios) == {"triton", "triton+graph"}
    assert all(r["p50"] > 0 and r["note"].startswith("best: sdpa") for r in ratios.values())


def test_classifier_flops_count_the_384px_tokens():
    from beit.classifier import ClassifierConfig

    def flops(image_size):
        return finetune_throughput.classifier_flops_per_image(ClassifierConfig(img_size=image_size))

    base224, base384 = flops(224), flops(384)
    # 577 tokens against 197: the linear layers scale with the tokens, attention with their square.
    assert 577 / 197 < base384 / base224 < (577 / 197) ** 2
    # BEiT-B/16 at 224 px: 17.56 GMAC forward (timm), a training step three forwards.
    assert base224 == pytest.approx(3 * 2 * 17.56e9, rel=0.02)


@pytest.mark.parametrize(
    "argv, message",
    [(["--image-size", "40"], "multiple of the patch size 16"), (["--image-size", "224,384", "--batch", "1,2,3"],
     "one per image size"), (["--impls", "sdpa,fast"], "unknown implementation"),
     (["--model", "beit_huge"], "is not one of")],
)  # fmt: skip
def test_bad_options_error_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        finetune_throughput.main(["--quick", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
