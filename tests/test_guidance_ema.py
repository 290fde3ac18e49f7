import pytest
import torch

from pokesprite.config import UNetConfig
from pokesprite.models.unet import UNet
from pokesprite.pipeline import guided_output
from pokesprite.train.ema import EMA
from pokesprite.train.diffusion import drop_captions


def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(16, 16, 32), heads=2), context_dim=32)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 8, 27, 27), torch.tensor([5, 700])
    ctx, unc = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    cond = unet(x, t, ctx, mask)
    uncond = unet(x, t, unc, mask)
    assert torch.allclose(guided_output(unet, x, t, ctx, mask, unc, mask, 1.0), cond, atol=1e-5)
    assert torch.allclose(guided_output(unet, x, t, ctx, mask, unc, mask, 0.0), uncond, atol=1e-5)
    assert torch.allclose(guided_output(unet, x, t, ctx, mask, unc, mask, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_ema_known_values_and_swap():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # warm-up decay min(0.9, 2/11): 0 -> 1 - 2/11
    assert abs(ema.shadow.weight.item() - 9 / 11) < 1e-6
    for _ in range(200):
        ema.update(model)
    assert abs(ema.shadow.weight.item() - 1.0) < 1e-6
    model.weight.data.fill_(5.0)
    with ema.averaged(model):
        assert abs(model.weight.item() - 1.0) < 1e-6
    assert model.weight.item() == 5.0
    off = EMA(model, decay=0.0)
    model.weight.data.fill_(2.0)
    off.update(model)
    assert off.shadow.weight.item() == 2.0


def test_caption_dropout_rate_and_replacement():
    hidden, mask = torch.ones(1000, 4, 3), torch.ones(1000, 4, dtype=torch.long)
    empty_h, empty_m = torch.zeros(1, 4, 3), torch.tensor([[1, 1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    out, drop = drop_captions({"hidden": hidden, "mask": mask}, {"hidden": empty_h, "mask": empty_m}, 0.1, g)
    h, m = out["hidden"], out["mask"]
    dropped = (h.abs().sum((1, 2)) == 0)
    assert torch.equal(dropped, drop)
    assert torch.equal(drop, torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.1)  # rate 0.1
    assert 60 < dropped.sum() < 140 and (m[dropped] == empty_m).all() and (m[~dropped] == 1).all()
    assert hidden.sum() == 1000 * 12  # the cached features are not modified
    out, drop = drop_captions({"hidden": hidden}, {"hidden": empty_h}, 0.0, g)
    assert torch.equal(out["hidden"], hidden) and not drop.any()


def test_foreach_ema_equals_the_per_parameter_lerp_and_ignores_skipped_updates():
    from pokesprite.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GroupNorm(2, 4))
    ema = EMA(model, 0.99)
    reference = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        skipped = n in (5, 6)
        ema.update(model, torch.tensor(not skipped))
        if not skipped:  # the reference: lerp each parameter with d = min(decay, (1 + k) / (10 + k))
            k = n - sum(1 for s in (5, 6) if s < n)
            d = min(0.99, (1 + k) / (10 + k))
            for avg, p in zip(reference, model.parameters()):
                avg.lerp_(p.detach(), 1 - d)
    assert ema.num_updates == 28
    for avg, ref in zip(ema.shadow.parameters(), reference):
        torch.testing.assert_close(avg, ref, atol=1e-6, rtol=1e-6)


def test_decay_for_a_half_life_halves_a_weight_in_that_many_steps():
    from pokesprite.train.ema import decay_for_half_life

    d = decay_for_half_life(693.0)
    assert d ** 693 == pytest.approx(0.5)
    assert decay_for_half_life(1.0) == 0.5
    with pytest.raises(ValueError):
        decay_for_half_life(0.0)
