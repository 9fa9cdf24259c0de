"""Batched inference: CUDA with autocast when available, else CPU with channels_last (or an ONNX Runtime session,
``runtimes``); inference_mode always."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when ``torch.cuda.is_available()``, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype autocast computes in on ``device``: ``auto`` float16 on CUDA, float32 (no autocast) on a CPU —
    inference always, training by default; ``bf16`` bfloat16 on either; ``fp32`` float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16 if precision == "auto" and device.type == "cuda" else torch.float32


def describe_device(device: torch.device) -> str:
    """What a model card records of the hardware a run used: the GPU's name, or the CPU's threads, the widest
    vector instructions PyTorch uses on it, whether it has AMX tiles, and whether it has native bfloat16. The same
    command repeats a run's figures only on the same kind of CPU (its kernels sum in their own order), so the card
    says which kind it was."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    capability = torch.backends.cpu.get_cpu_capability()
    amx = ", AMX" if has_amx() else ""
    native = "native bfloat16" if native_bfloat16(device) else "no native bfloat16"
    return f"cpu: {torch.get_num_threads()} threads, {capability}{amx}, {native}"


def has_amx() -> bool:
    """Whether the CPU has AMX tiles, which oneDNN uses for bfloat16 matrix products (False where torch cannot
    tell)."""
    return _private_probe(torch.cpu, "_is_amx_tile_supported", missing=False)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that says so, or a CPU whose oneDNN build finds
    AVX512-BF16 or AMX. Elsewhere PyTorch emulates it, several times slower than float32 (a 2-core AVX2 EPYC: a
    96-px crop epoch of ``train --precision bf16`` took 259 s, in float32 24 s)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return _private_probe(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing=True)  # PyTorch's own CPU check


def _private_probe(owner: object, name: str, missing: bool) -> bool:
    """The answer of PyTorch's private capability probe ``owner.name`` (torch has no public one), ``missing``
    where this torch version lacks it."""
    probe = getattr(owner, name, None)
    return bool(probe()) if probe is not None else missing


def autocast(device: torch.device, dtype: torch.dtype | None = None) -> torch.autocast:
    """Autocast to ``dtype`` (None: ``autocast_dtype(device)``) on ``device``; disabled for float32."""
    dtype = autocast_dtype(device) if dtype is None else dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def fracture_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(fracture) per row: sigmoid of a single logit, or 1 - softmax(class 0 = no fracture) of several."""
    if logits.ndim == 1 or logits.shape[1] == 1:
        return torch.sigmoid(logits.reshape(-1))
    return 1.0 - torch.softmax(logits, dim=1)[:, 0]


class TorchRuntime:
    """The network itself in channels_last, under autocast to ``dtype`` (None: float16 on a GPU, float32 — no
    autocast — on a CPU; ``runtimes`` offers bfloat16 on a CPU as ``torch-bf16``); inference_mode."""

    def __init__(self, network: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.dtype = autocast_dtype(device) if dtype is None else dtype
        self.name = "torch-bf16" if self.dtype == torch.bfloat16 else "torch"
        self._format = torch.channels_last
        self.network = network.to(device).to(memory_format=self._format).eval()  # type: ignore[call-overload]

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, outputs) float32 logits of a (N, 1, S, S) batch, on the CPU."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            inputs = batch.to(self.device, non_blocking=True).contiguous(memory_format=self._format)
            return self.network(inputs).float().cpu()


class Runtime(Protocol):
    """Where the network runs (``TorchRuntime``, or an ONNX Runtime session, ``runtimes``): a (N, 1, S, S) float32
    batch in, the network's (N, outputs) logits out."""

    name: str

    def logits(self, batch: torch.Tensor) -> torch.Tensor: ...


def batches(count: int, batch_size: int) -> list[slice]:
    """``count`` inputs cut into the fewest batches of at most ``batch_size``, as even as they come (18 inputs at
    16: 9 + 9, not 16 + 2 — a batch of two costs nearly what a full one does)."""
    if count <= 0:
        return []
    parts = -(-count // batch_size)
    bounds = [round(k * count / parts) for k in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


class Predictor:
    """Turns preprocessed (1, S, S) tensors into fracture probabilities, in batches, on ``runtime`` (default: the
    network on ``device`` in torch). ``network`` and ``device`` stay the torch network's: Grad-CAM needs its
    gradients whatever runtime scores."""

    def __init__(
        self,
        network: torch.nn.Module,
        device: str = "auto",
        threads: int | None = None,
        batch_size: int = 16,
        runtime: Runtime | None = None,
    ) -> None:
        self.device = select_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.batch_size = max(1, batch_size)
        torch_runtime = TorchRuntime(network, self.device)
        self.network = torch_runtime.network
        self.runtime: Runtime = runtime if runtime is not None else torch_runtime
        LOGGER.info("inference on %s, %s runtime (batch %d)", self.device, self.runtime.name, self.batch_size)

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities for a (N, 1, S, S) batch."""
        return fracture_probability(self.runtime.logits(batch)).numpy().astype(np.float64)

    def predict(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        """Probabilities for any number of (1, S, S) tensors, in batches (``batches``)."""
        if not inputs:
            return np.zeros(0, dtype=np.float64)
        out = [self.predict_batch(torch.stack(list(inputs[part]))) for part in batches(len(inputs), self.batch_size)]
        return np.concatenate(out)
