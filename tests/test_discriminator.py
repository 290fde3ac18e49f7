"""The VAE's patch discriminator and its hinge / adaptive-weight losses, with known answers."""
import pytest
import torch

from pokesprite.config import ConfigError, DiscriminatorConfig
from pokesprite.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 2.5 / 3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # a perfect discriminator (margins met) has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3 * w).sum()  # grad (3, 3): norm 3 sqrt 2
    g = (w ** 2).sum()  # grad 2w = (2, 4): norm 2 sqrt 5
    expected = (3 * 2 ** 0.5) / (2 * 5 ** 0.5 + 1e-4)
    assert adaptive_weight(rec, g, w).item() == pytest.approx(expected, rel=1e-6)
    assert adaptive_weight(rec, 0 * g, w).item() == 1e4  # clamped when the adversarial gradient vanishes


def test_patch_discriminator_judges_patches_of_a_sprite():
    d = PatchDiscriminator(DiscriminatorConfig(weight=1.0, channels=8, layers=3))
    logits = d(torch.randn(2, 3, 215, 215))
    assert logits.shape == (2, 1, 24, 24)  # 215 -> 107 -> 53 -> 26 (4x4, stride 2), -> 25 -> 24 (4x4, stride 1)
    assert torch.isfinite(logits).all()


def test_discriminator_config_errors_name_the_section():
    with pytest.raises(ConfigError, match="vae.discriminator"):
        DiscriminatorConfig(channels=6)
    with pytest.raises(ConfigError, match="vae.discriminator"):
        DiscriminatorConfig(weight=-1.0)
