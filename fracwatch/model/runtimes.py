"""Where a bundle's network runs: torch (CUDA with AMP, or the CPU in channels_last, float32 or bfloat16), or ONNX
Runtime on the CPU in float32 or int8 (static quantisation, calibrated on radiographs).

Every runtime but torch float32 is held to a gate on the test split before the card records it (``fracwatch
export-runtime``: the card's ``runtimes``, with the AUROC kept, the largest probability difference, and, for the
ONNX files, their checksums and the weights they came from); a file whose checksum or source weights do not
match the card is refused, never run. ``auto`` times torch and every runtime that passed its gate on this machine,
once, when the scorer starts, and takes the fastest: bfloat16 wins only where the CPU computes it natively
(AVX512-BF16, AMX), int8 only where it has VNNI or AMX.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fracwatch.errors import FracwatchError
from fracwatch.model.predictor import Predictor, Runtime, TorchRuntime, select_device

if TYPE_CHECKING:
    from fracwatch.model.bundle import Bundle

LOGGER = logging.getLogger(__name__)

TORCH, TORCH_BF16, ONNX, ONNX_INT8 = "torch", "torch-bf16", "onnx", "onnx-int8"
CHOICES = ("auto", TORCH, TORCH_BF16, ONNX, ONNX_INT8)
FILES = {ONNX: "model.onnx", ONNX_INT8: "model.int8.onnx"}
INPUT, OUTPUT = "image", "logits"


class RuntimeUnavailable(FracwatchError):
    """A runtime the configuration asks for cannot run this bundle here."""


class OnnxRuntime:
    """An ONNX file on ONNX Runtime's CPU provider, ``threads`` intra-op threads that sleep, not spin, between
    batches (a spinning pool would take the CPU the DICOM listener needs)."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are not ours to act on
        self.name = name
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self._session.run([OUTPUT], {INPUT: array})[0])


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def recorded(bundle: Bundle) -> list[str]:
    """The runtimes the bundle's card records as having passed their gate (their files verified at load)."""
    return [name for name, entry in bundle.card.runtimes.items() if entry.passed and name in CHOICES]


def check(bundle: Bundle, requested: str, device: torch.device) -> None:
    """Refuse a runtime that cannot run this bundle here: unknown, not recorded as passed by the card, or an ONNX
    one on a GPU or without onnxruntime. The daemon calls it before anything starts; ``build`` before building."""
    if requested not in CHOICES:
        raise RuntimeUnavailable(f"runtime {requested!r}: choose from {', '.join(CHOICES)}")
    if requested in ("auto", TORCH):
        return
    if requested not in recorded(bundle):
        raise RuntimeUnavailable(
            f"bundle {bundle.card.name} {bundle.card.version} records no {requested} runtime that passed its gate; "
            f"measure it with fracwatch export-runtime"
        )
    if requested == TORCH_BF16:
        return
    if device.type != "cpu":
        raise RuntimeUnavailable(f"runtime {requested} runs on the CPU only; the device is {device.type}")
    if not onnx_available():
        raise RuntimeUnavailable(f"runtime {requested} needs the onnxruntime package (pip install onnxruntime)")
    if bundle.card.runtimes[requested].file is None:
        raise RuntimeUnavailable(f"the card's {requested} runtime names no file")


def build(bundle: Bundle, name: str, device: torch.device, threads: int) -> Runtime:
    """Runtime ``name`` (not ``auto``) for the bundle, once ``check`` lets it (files' checksums are verified by
    the bundle's loader)."""
    check(bundle, name, device)
    if name == TORCH:
        return TorchRuntime(bundle.network, device)
    if name == TORCH_BF16:
        return TorchRuntime(bundle.network, device, torch.bfloat16)
    file = bundle.card.runtimes[name].file
    assert file is not None  # check() refused a runtime without one
    return OnnxRuntime(name, bundle.path / file, threads)


def _runs(bundle: Bundle, name: str, device: torch.device) -> bool:
    try:
        check(bundle, name, device)
    except RuntimeUnavailable:
        return False
    return True


def throughput(runtime: Runtime, size: int, batch: int = 8, seconds: float = 0.4) -> float:
    """Inputs per second of ``runtime`` on a random (batch, 1, size, size) batch, after one warm-up batch."""
    inputs = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    runtime.logits(inputs)
    count, started = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - started < seconds:
        runtime.logits(inputs)
        count += batch
    return count / (time.perf_counter() - started)


def predictor_for(
    bundle: Bundle, device: str = "auto", threads: int | None = None, batch_size: int = 16, runtime: str = "auto"
) -> Predictor:
    """The scoring path's predictor for ``bundle``: ``threads`` (None: torch's current count) for torch and ONNX
    Runtime alike, the runtime ``choose`` picks."""
    if threads:
        torch.set_num_threads(threads)  # before the timing: torch and ONNX Runtime get the same threads
    chosen = choose(bundle, runtime, select_device(device), threads or torch.get_num_threads())
    return Predictor(bundle.network, device, batch_size=batch_size, runtime=chosen)


def choose(bundle: Bundle, requested: str, device: torch.device, threads: int) -> Runtime:
    """The runtime to score with: ``requested``, or for ``auto`` torch on a GPU and, on a CPU, the fastest on this
    machine of torch and the runtimes the bundle records (timed here, about a second each)."""
    if requested != "auto":
        return build(bundle, requested, device, threads)
    candidates = [TORCH] + [name for name in recorded(bundle) if device.type == "cpu" and _runs(bundle, name, device)]
    if len(candidates) == 1:
        return build(bundle, TORCH, device, threads)
    size = bundle.preprocess_config.input_size
    timed = {name: build(bundle, name, device, threads) for name in candidates}
    rates = {name: throughput(runtime, size) for name, runtime in timed.items()}
    best = max(rates, key=lambda name: rates[name])
    LOGGER.info("inference runtime %s (inputs/s here: %s)", best, ", ".join(f"{n} {r:.0f}" for n, r in rates.items()))
    return timed[best]


def export_onnx(network: torch.nn.Module, path: Path, input_size: int) -> None:
    """The network as one ONNX file (torch.export-based exporter) with a dynamic batch dimension, float32."""
    example = torch.zeros(2, 1, input_size, input_size)
    torch.onnx.export(
        network.cpu().eval(),
        (example,),
        str(path),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def quantize_int8(source: Path, target: Path, calibration: Iterable[np.ndarray]) -> None:
    """Static int8 quantisation of the float32 graph ``source`` (QDQ, per-channel signed weights, unsigned
    activations), its activation ranges taken from ``calibration`` batches (N, 1, S, S): real radiographs the
    test split does not hold."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]) -> None:
            self._batches = batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}

    prepared = target.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            _Reader(iter(calibration)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
