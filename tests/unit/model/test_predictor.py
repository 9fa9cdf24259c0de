"""Batches as even as they come; runtimes chosen and refused as the configuration asks."""

from __future__ import annotations

import pytest
import torch

from fracwatch.config import load_settings
from fracwatch.model import runtimes
from fracwatch.model.bundle import load_bundle
from fracwatch.model.predictor import batches
from tests.conftest import PHANTOM_MODEL


@pytest.mark.parametrize(
    ("count", "size", "lengths"),
    [(0, 16, []), (1, 16, [1]), (16, 16, [16]), (17, 16, [8, 9]), (18, 16, [9, 9]), (40, 16, [13, 14, 13])],
)
def test_batches_are_the_fewest_and_as_even_as_they_come(count: int, size: int, lengths: list[int]) -> None:
    parts = batches(count, size)
    assert [p.stop - p.start for p in parts] == lengths
    assert sum(lengths) == count and all(n <= size for n in lengths)
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]  # contiguous, in order


def test_a_runtime_the_bundle_does_not_record_is_refused_in_one_line() -> None:
    bundle = load_bundle(PHANTOM_MODEL)  # no runtimes in its card
    cpu = torch.device("cpu")
    runtimes.check(bundle, "auto", cpu)
    runtimes.check(bundle, "torch", cpu)
    for name in ("torch-bf16", "onnx", "onnx-int8"):
        with pytest.raises(runtimes.RuntimeUnavailable, match=f"records no {name} runtime that passed its gate"):
            runtimes.check(bundle, name, cpu)
    with pytest.raises(runtimes.RuntimeUnavailable, match="choose from"):
        runtimes.check(bundle, "tensorrt", cpu)
    assert runtimes.choose(bundle, "auto", cpu, 1).name == "torch"  # nothing else to time


def test_auto_takes_a_runtime_that_passed_and_scores_as_torch_does() -> None:
    bundle = load_bundle(load_settings().model_path)
    passed = runtimes.recorded(bundle)
    assert "onnx" in passed and "onnx-int8" not in passed  # int8 failed its gate: never chosen
    cpu = torch.device("cpu")
    chosen = runtimes.choose(bundle, "auto", cpu, 1)
    assert chosen.name in ["torch", *passed]
    x = torch.rand(3, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    reference = runtimes.build(bundle, "torch", cpu, 1).logits(x)
    onnx = runtimes.build(bundle, "onnx", cpu, 1).logits(x)
    assert onnx.shape == reference.shape and torch.allclose(onnx, reference, atol=1e-3)
    with pytest.raises(runtimes.RuntimeUnavailable, match="onnx-int8"):
        runtimes.build(bundle, "onnx-int8", cpu, 1)
