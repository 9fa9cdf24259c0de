"""Grad-CAM heatmaps (MONAI's implementation) for the model's fracture logit."""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM


def last_conv_layer(network: torch.nn.Module) -> str:
    """The layer Grad-CAM explains: the last feature block before pooling (``layer4`` of a ResNet,
    ``features`` of a DenseNet), else the last convolution."""
    modules = dict(network.named_modules())
    for candidate in ("layer4", "features", "_conv_head"):
        if candidate in modules:
            return candidate
    name = ""
    for module_name, module in network.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            name = module_name
    if not name:
        raise ValueError("the network has no 2-D convolution for Grad-CAM")
    return name


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each (1, H, W) map scaled to [0, 1], strongest evidence 1; a flat map (no evidence anywhere) all 0.

    Not MONAI's ``default_normalizer``: it maps (min, max) to (1, 0) — it flips the map, so the evidence would be
    the coolest place on the overlay."""
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    span = maps.amax(dim=(1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def grad_cam(network: torch.nn.Module, inputs: torch.Tensor, target_layer: str | None = None) -> np.ndarray:
    """Heatmaps in [0, 1], shape (N, S, S), for preprocessed inputs (N, 1, S, S), on the CPU in float32: 1 where
    the evidence for the explained class is strongest.

    Runs with gradients (Grad-CAM needs them), on a copy-free eval-mode network; parameters are not changed. An
    ensemble (``members``) is explained by the mean of its members' heatmaps, each for its own logit.
    """
    members = getattr(network, "members", None)
    if members is not None and target_layer is None:
        return np.mean([grad_cam(member, inputs) for member in members], axis=0).astype(np.float32)
    network = network.eval()
    layer = target_layer or last_conv_layer(network)
    cam = GradCAM(nn_module=network, target_layers=layer, postprocessing=_unit_range)
    with torch.no_grad():
        outputs = network(inputs[:1].float()).shape[1]
    with torch.enable_grad():
        if outputs == 1:
            maps = cam(x=inputs.float().requires_grad_(True), class_idx=0)
        else:  # multi-class: explain each image's most likely fracture class (class 0 is "no fracture")
            with torch.no_grad():
                targets = network(inputs.float())[:, 1:].argmax(dim=1) + 1
            maps = torch.cat(
                [cam(x=inputs[i : i + 1].float().requires_grad_(True), class_idx=int(t)) for i, t in enumerate(targets)]
            )
    network.zero_grad(set_to_none=True)
    return np.asarray(maps.detach().cpu().numpy()[:, 0], dtype=np.float32)
