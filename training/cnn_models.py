"""CIFAR-style ResNet and VGG-BN, split into partitions by stage, with one exit head per stage.

Widths scale with `width` so the experiments fit a 2-core CPU; the layer structure (ResNet-20:
3 stages of 3 basic blocks; VGG-11-BN: 8 conv layers in 5 stages) is the published one.
"""

from __future__ import annotations

from torch import nn

from training.incremental import IncrementalNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


def exit_head(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def resnet20(in_channels: int = 3, classes: int = 10, width: float = 1.0, blocks: int = 3) -> IncrementalNet:
    """ResNet-(6·blocks+2); partitions: stem + stage 1, stage 2, stage 3."""
    widths = [max(4, int(c * width)) for c in (16, 32, 64)]
    partitions, cin = [], widths[0]
    for stage, cout in enumerate(widths):
        layers: list[nn.Module] = []
        if stage == 0:
            layers += [nn.Conv2d(in_channels, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
            cin = cout
        partitions.append(nn.Sequential(*layers))
    return IncrementalNet(partitions, [exit_head(c, classes) for c in widths])


VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def vgg11_bn(in_channels: int = 3, classes: int = 10, width: float = 1.0, pools: int = 4) -> IncrementalNet:
    """VGG-11 with batch norm; partitions are its 5 conv stages, the first `pools` ending in a
    2x2 max-pool (4 for 28x28 or 32x32 inputs; the original's fifth pool would leave 0x0 on 28x28)."""
    partitions, heads, cin = [], [], in_channels
    for stage, convs in enumerate(VGG11_STAGES):
        layers: list[nn.Module] = []
        for c in convs:
            cout = max(4, int(c * width))
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        if stage < pools:
            layers.append(nn.MaxPool2d(2))
        partitions.append(nn.Sequential(*layers))
        heads.append(exit_head(cin, classes))
    return IncrementalNet(partitions, heads)


CNNS = {"resnet20": resnet20, "vgg11": vgg11_bn}
