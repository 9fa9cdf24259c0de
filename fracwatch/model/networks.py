"""Network construction from the architecture named in a model card. Default backbones come from MONAI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks import nets

from fracwatch.errors import FracwatchError


class ArchitectureError(FracwatchError):
    """The model card names an architecture fracwatch cannot build."""


def _monai_resnet(params: dict[str, Any]) -> torch.nn.Module:
    return nets.ResNet(spatial_dims=2, n_input_channels=1, num_classes=params.pop("outputs", 1), **params)


def _monai_resnet_maxpool(params: dict[str, Any]) -> torch.nn.Module:
    # Global max instead of average pooling: a fracture is a small local finding, and a mean over the whole
    # image dilutes it; the strongest local response carries it.
    network = _monai_resnet(params)
    network.avgpool = torch.nn.AdaptiveMaxPool2d(1)
    return network


class ResNetLogitMap(nets.ResNet):
    """A MONAI ResNet whose classifier runs at every cell of its last feature map (a 1 × 1 convolution): a map
    of local fracture logits; the image's logit is the map's maximum. A fracture is a small local finding: the
    map says where, training data with boxes supervises it cell by cell (``logit_map``), and Grad-CAM of
    ``layer4`` explains the same evidence."""

    def __init__(self, outputs: int, **params: Any) -> None:
        super().__init__(spatial_dims=2, n_input_channels=1, num_classes=outputs, feed_forward=False, **params)
        self.head = torch.nn.Conv2d(self.in_planes, outputs, kernel_size=1)  # in_planes: layer4's width

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, outputs, H/32, W/32) local logits; (H/16, W/16) without the stem's max pool (``no_max_pool``)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.logit_map(x), dim=(2, 3))


def _monai_resnet_logit_map(params: dict[str, Any]) -> torch.nn.Module:
    return ResNetLogitMap(outputs=params.pop("outputs", 1), **params)


class LogitMapEnsemble(torch.nn.Module):
    """Logit-map networks of the same input and map stride whose maps are averaged cell by cell: the image's logit
    is the mean map's maximum, so the members must agree on where a break is for it to count. Whether the mean
    ranks better than its members is a question for validation data (docs/model-development.md: on the synth set,
    not clearly); scoring costs one member's time per member."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ArchitectureError("an ensemble needs at least two members")
        if not all(hasattr(m, "logit_map") for m in members):
            raise ArchitectureError("ensemble members must be logit-map networks (--arch *-map*)")
        self.members = torch.nn.ModuleList(members)

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        maps = [member.logit_map(x) for member in self.members]  # type: ignore[operator]
        if any(m.shape != maps[0].shape for m in maps):
            raise ArchitectureError(f"ensemble members' maps differ in shape: {[tuple(m.shape) for m in maps]}")
        return torch.stack(maps).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.logit_map(x), dim=(2, 3))


def _logit_map_ensemble(params: dict[str, Any]) -> torch.nn.Module:
    outputs = {"outputs": params.pop("outputs")} if "outputs" in params else {}
    members = params.pop("members", None)
    if not isinstance(members, list) or params:
        raise ArchitectureError("an ensemble's params are {'members': [{'name': ..., 'params': {...}}, ...]} only")
    return LogitMapEnsemble([build_network(m["name"], {**m.get("params", {}), **outputs}) for m in members])


def _monai_densenet121(params: dict[str, Any]) -> torch.nn.Module:
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=params.pop("outputs", 1), **params)


def _monai_efficientnet(params: dict[str, Any]) -> torch.nn.Module:
    model_name = params.pop("model_name", "efficientnet-b0")
    outputs = params.pop("outputs", 1)
    return nets.EfficientNetBN(
        model_name, pretrained=False, spatial_dims=2, in_channels=1, num_classes=outputs, **params
    )


def _torchvision(name: str) -> Callable[[dict[str, Any]], torch.nn.Module]:
    def build(params: dict[str, Any]) -> torch.nn.Module:
        try:
            import torchvision
        except Exception as exc:
            raise ArchitectureError(f"torchvision is not usable here ({exc}); install the 'torchvision' extra") from exc
        outputs = params.pop("outputs", 1)
        model = getattr(torchvision.models, name)(weights=None, num_classes=outputs, **params)
        _first_conv_to_one_channel(model)
        return model

    return build


def _first_conv_to_one_channel(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            replacement = torch.nn.Conv2d(
                1,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                bias=module.bias is not None,
            )
            parent = model
            *path, leaf = name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, leaf, replacement)
            return


BUILDERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "monai.ResNet": _monai_resnet,
    "monai.ResNetMaxPool": _monai_resnet_maxpool,
    "monai.ResNetLogitMap": _monai_resnet_logit_map,
    "fracwatch.LogitMapEnsemble": _logit_map_ensemble,
    "monai.DenseNet121": _monai_densenet121,
    "monai.EfficientNetBN": _monai_efficientnet,
    "torchvision.resnet18": _torchvision("resnet18"),
    "torchvision.densenet121": _torchvision("densenet121"),
    "torchvision.efficientnet_b0": _torchvision("efficientnet_b0"),
}


def _small_resnet(layers: list[int], planes: list[int], max_pool: bool = True) -> dict[str, Any]:
    # "norm" reaches the stem only: MONAI's ResNet builds its blocks (_make_layer) with BatchNorm whatever it is
    # given (MONAI 1.6), so these networks are a GroupNorm stem and BatchNorm blocks (eval uses running stats);
    # every shipped bundle's weights have that layout, so it stays as it is
    params: dict[str, Any] = {
        "block": "basic",
        "layers": layers,
        "block_inplanes": planes,
        "conv1_t_stride": 2,
        "norm": ["group", {"num_groups": 8}],
    }
    if not max_pool:
        params["no_max_pool"] = True
    return params


# Named presets for `fracwatch train --arch`: (builder, parameters).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-resnet": ("monai.ResNet", _small_resnet([1, 1, 1, 1], [16, 32, 64, 128])),
    "tiny-resnet-max": ("monai.ResNetMaxPool", _small_resnet([1, 1, 1, 1], [16, 32, 64, 128])),
    "small-resnet": ("monai.ResNet", _small_resnet([1, 1, 2, 1], [24, 48, 96, 192])),
    "tiny-resnet-map": ("monai.ResNetLogitMap", _small_resnet([1, 1, 1, 1], [16, 32, 64, 128])),
    "small-resnet-map": ("monai.ResNetLogitMap", _small_resnet([1, 1, 2, 1], [24, 48, 96, 192])),
    # A map at 1/16 of the input (no max pool in the stem): finer cells, twice the detail at every layer; on
    # DRR twins it learnt the break far faster than the 1/32 map (docs/model-development.md).
    "tiny-resnet-map16": ("monai.ResNetLogitMap", _small_resnet([1, 1, 1, 1], [16, 32, 64, 128], max_pool=False)),
    "small-resnet-map16": (
        "monai.ResNetLogitMap",
        _small_resnet([1, 1, 2, 1], [24, 48, 96, 192], max_pool=False),
    ),
    "resnet18": (
        "monai.ResNet",
        {"block": "basic", "layers": [2, 2, 2, 2], "block_inplanes": [64, 128, 256, 512], "conv1_t_stride": 2},
    ),
    "resnet34": (
        "monai.ResNet",
        {"block": "basic", "layers": [3, 4, 6, 3], "block_inplanes": [64, 128, 256, 512], "conv1_t_stride": 2},
    ),
    "densenet121": ("monai.DenseNet121", {}),
    "efficientnet-b0": ("monai.EfficientNetBN", {"model_name": "efficientnet-b0"}),
}


def build_network(architecture: str, params: dict[str, Any]) -> torch.nn.Module:
    """Build the network named ``architecture``: 1 input channel, ``params["outputs"]`` logits (default 1)."""
    try:
        builder = BUILDERS[architecture]
    except KeyError:
        raise ArchitectureError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(BUILDERS))}"
        ) from None
    try:
        return builder(dict(params))
    except ArchitectureError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"cannot build {architecture} with {params}: {exc}") from exc
