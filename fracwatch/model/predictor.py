"""Batched inference: CUDA with autocast when available, else CPU with channels_last; inference_mode always."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


class Predictor:
    """Turns preprocessed (1, S, S) tensors into fracture probabilities."""

    def __init__(
        self, network: torch.nn.Module, device: str = "auto", threads: int | None = None, batch_size: int = 16
    ) -> None:
        self.device = select_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.batch_size = max(1, batch_size)
        self._memory_format = torch.channels_last
        network = network.to(self.device)
        self.network = network.to(memory_format=self._memory_format).eval()  # type: ignore[call-overload]
        LOGGER.info("inference on %s (batch %d)", self.device, self.batch_size)

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities for a (N, 1, S, S) batch."""
        with torch.inference_mode(), autocast(self.device):
            inputs = batch.to(self.device, non_blocking=True).contiguous(memory_format=self._memory_format)
            return fracture_probability(self.network(inputs).float()).cpu().numpy().astype(np.float64)

    def predict(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        """Probabilities for any number of (1, S, S) tensors, in batches."""
        if not inputs:
            return np.zeros(0, dtype=np.float64)
        out = [
            self.predict_batch(torch.stack(list(inputs[start : start + self.batch_size])))
            for start in range(0, len(inputs), self.batch_size)
        ]
        return np.concatenate(out)
