"""Cost of one training batch on this machine: augmentation and the network's step.

    python bench/training_step.py [--arch tiny-resnet-map16] [--batch 32] [--repeat 10]

Augmentation: fracwatch's batched ``Augmentation`` (one MONAI ``AffineTransform`` call per batch, on the
batch's device) against the baseline it replaced, MONAI's array transforms called per image (RandRotate,
RandZoom, RandFlip, RandAdjustContrast, RandGaussianNoise; a twin pair as two channels of one call). Step:
forward, backward and AdamW on the logit map, contiguous (NCHW) against channels_last, and channels_last in
float32 against the bfloat16 autocast of ``train --precision bf16`` (on this machine's device: CUDA when there is
one), and at 256 px the bfloat16 step with the stem and first stage frozen (``train --freeze-stem``'s whole-image
phase). For 96-px crops and whole 256-px inputs, random pixels (the cost does not depend on them). Prints seconds
per batch and ratios.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from monai.transforms import Compose, RandAdjustContrast, RandFlip, RandGaussianNoise, RandRotate, RandZoom

from fracwatch.model.augmentation import Augmentation
from fracwatch.model.networks import PRESETS, build_network
from fracwatch.model.predictor import autocast, select_device
from fracwatch.model.training import set_stem_frozen, stem_freezable


def per_image_monai(seed: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    spatial = Compose(
        [
            RandRotate(range_x=0.17, prob=0.5, padding_mode="zeros"),
            RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5, padding_mode="constant"),
            RandFlip(prob=0.5, spatial_axis=1),
        ]
    )
    intensity = Compose([RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)), RandGaussianNoise(prob=0.3, std=0.03)])
    spatial.set_random_state(seed=seed)
    intensity.set_random_state(seed=seed + 1)

    def run(images: torch.Tensor, masks: torch.Tensor) -> None:
        for pair in range(0, len(images), 2):  # twins: two channels of one call
            moved = torch.as_tensor(spatial(torch.cat([images[pair : pair + 2, 0], masks[pair : pair + 2, 0]])))
            intensity(moved[:2])

    return run


def seconds(work: Callable[[], object], repeat: int) -> float:
    work()  # warm-up: MONAI's and torch's first calls cost far more than the next ones
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat


def step_seconds(
    arch: str,
    images: torch.Tensor,
    memory_format: torch.memory_format,
    repeat: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    freeze_stem: bool = False,
) -> float:
    """Forward, backward and AdamW of ``arch``'s logit map on ``images`` in ``memory_format``, under training's
    autocast to ``dtype`` (none for float32), on ``device`` (None: the CPU); with ``freeze_stem`` the stem and first
    stage fixed, as ``train --freeze-stem`` fixes them in the whole-image phase."""
    device = device or torch.device("cpu")
    builder, params = PRESETS[arch]
    network = build_network(builder, {**params, "outputs": 1}).to(device)
    network.to(memory_format=memory_format)  # type: ignore[call-overload]
    if freeze_stem:
        set_stem_frozen(network, frozen=True)
    optimiser = torch.optim.AdamW(p for p in network.parameters() if p.requires_grad)
    x = images.to(device).contiguous(memory_format=memory_format)

    def step() -> None:
        optimiser.zero_grad()
        with autocast(device, dtype):
            cells = network.logit_map(x).float()  # type: ignore[operator]
        cells.amax(dim=(2, 3)).sum().backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return seconds(step, repeat)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="tiny-resnet-map16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    batched, baseline = Augmentation(0), per_image_monai(0)
    groups = [[p, p + 1] for p in range(0, args.batch, 2)]
    for size in (96, 256):
        images = torch.rand(args.batch, 1, size, size)
        masks = (torch.rand(args.batch, 1, size, size) > 0.9).float()
        old = seconds(partial(baseline, images, masks), args.repeat)
        new = seconds(partial(batched, images, masks, groups), args.repeat)
        print(f"{size:>3} px augmentation: per-image MONAI {old:.3f} s, batched {new:.3f} s ({new / old:.2f}x)")
        repeat = max(2, args.repeat // 3)
        nchw = step_seconds(args.arch, images, torch.contiguous_format, repeat)
        last = step_seconds(args.arch, images, torch.channels_last, repeat)
        print(f"{size:>3} px {args.arch} step: NCHW {nchw:.3f} s, channels_last {last:.3f} s ({last / nchw:.2f}x)")
        device = select_device("auto")
        # on a CPU the float32 channels_last step is the one just measured
        fp32 = (
            last
            if device.type == "cpu"
            else step_seconds(args.arch, images, torch.channels_last, repeat, device=device)
        )
        bf16 = step_seconds(args.arch, images, torch.channels_last, repeat, torch.bfloat16, device)
        print(
            f"{size:>3} px {args.arch} step on {device.type}, channels_last: float32 {fp32:.3f} s, "
            f"bfloat16 autocast {bf16:.3f} s ({bf16 / fp32:.2f}x)"
        )
        if size == 256 and stem_freezable(args.arch):
            frozen = step_seconds(args.arch, images, torch.channels_last, repeat, torch.bfloat16, device, True)
            ratio = frozen / bf16
            print(f"{size:>3} px bfloat16 step with the stem and first stage frozen: {frozen:.3f} s ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
