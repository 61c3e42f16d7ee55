"""Vision models for MNIST-sized inputs: a torchvision ResNet-18 and a small timm ViT.

Both are the libraries' own classes, only resized for 1-channel 28x28 digits, so probing
them exercises :class:`~koopman_hooks.probe.KoopmanProbe` on real third-party modules:

- ``mnist_resnet18``: probe ``layer1`` ... ``layer4`` (conv maps ``(B, C, H, W)`` of
  64x14x14, 128x7x7, 256x4x4 and 512x2x2; half that with ``stem_stride=2``);
- ``mnist_vit``: probe ``blocks.*`` (tokens ``(B, N, D)``: ``(28 / patch)^2`` patch tokens,
  plus a CLS token when ``class_token=True``).

Which reduction to use at a ViT's blocks
----------------------------------------
A *lossy* reduction (``pool``, ``cls``, ``mean``) decodes a prediction with ``like=``, the
layer's real output: whatever the reduction ignores is copied from the real forward pass.
That is honest exactly when the rest of the network reads nothing but the reduced
features, and only then:

- at the *last* block of a ViT with ``global_pool="token"``, ``"cls"`` is honest: the final
  LayerNorm acts token by token and the head reads token 0 only, so the copied patch tokens
  cannot reach the logits;
- at the last block of a ViT with ``global_pool="avg"`` and ``class_token=False``,
  ``"mean"`` is honest: the head reads the mean token (then ``fc_norm``);
- at an *inner* block (``patch(src=..., dst="blocks.3")``), later blocks attend to every
  token, so ``"cls"``/``"mean"``/``"pool"`` let the real tokens carry information the surrogate
  never predicted, and the patched accuracy flatters it. Use ``"flatten"`` (exact; the
  default while ``N * D <= 4096``) at any patched layer that is not the last one.

The source layer's reduction only limits what the surrogate sees, so a lossy source is
never dishonest, just harder to fit. The same holds for ``pool`` at a conv layer: a
ResNet's head (global average pool, then ``fc``) reads only channel means, so
``"pool:1x1"`` is honest at ``layer4``; at an inner dst layer the within-cell detail is
the real model's, so patch inner layers with ``"flatten"`` when the patched numbers must
be the surrogate's alone. Inner layers that are only *probed* (trajectory states for the
loss and ``state_fvu_per_layer``), not patched, may use any reduction.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["mnist_resnet18", "mnist_vit"]


def mnist_resnet18(
    num_classes: int = 10,
    in_chans: int = 1,
    stem_stride: int = 1,
    maxpool: bool = True,
    channels_last: bool = False,
) -> nn.Module:
    """torchvision's ``resnet18(num_classes=...)`` for ``(in_chans, 28, 28)`` images.

    ``conv1`` becomes a 3x3 convolution of stride ``stem_stride`` (the 7x7, stride-2 stem
    would blur a digit's strokes). ``maxpool`` (3x3, stride 2) is kept by default, so the
    four stages run at 14, 7, 4 and 2 pixels: about 0.12 GMAC per image, four times less
    than with ``maxpool=False`` (28, 14, 7, 4), which is what makes CPU training feasible.
    ``stem_stride=2`` halves the maps once more (7, 4, 2, 1; about 0.035 GMAC, roughly 2x
    faster to train and 4x faster to run on a CPU); the MNIST recipe uses it. Stage shapes
    at the defaults: ``layer1`` 64x14x14, ``layer2`` 128x7x7, ``layer3`` 256x4x4, ``layer4``
    512x2x2. ``channels_last=True`` stores the weights NHWC, which speeds up CPU inference
    (the probe's many forward passes) by about 1.7x; outputs are the same.
    """
    import torch
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def mnist_vit(
    num_classes: int = 10,
    depth: int = 6,
    embed_dim: int = 64,
    patch_size: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    img_size: int = 28,
    in_chans: int = 1,
    global_pool: str = "token",
    class_token: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A small timm ``VisionTransformer`` for ``(in_chans, img_size, img_size)`` images.

    Defaults: 7x7 = 49 patches of 4x4 pixels plus a CLS token, 6 pre-norm blocks of width
    64 (4 heads, MLP ratio 2), classified from the CLS token (``global_pool="token"``).
    Extra keyword arguments go to ``timm.models.vision_transformer.VisionTransformer``.
    The MNIST recipe uses ``patch_size=7`` (16 tokens: 3.5x faster on a CPU, and a ViT
    needs many passes over the data) with ``global_pool="avg", class_token=False``, whose
    head reads the mean token: the probe takes the last block whole like the blocks before it
    (every token reaches that head), and ``reduce="mean"`` there would be honest too.
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        global_pool=global_pool,  # type: ignore[arg-type]
        class_token=class_token,
        **kwargs,
    )

