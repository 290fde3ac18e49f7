"""benchmarks/peer.py: our models against diffusers' of equal configuration (needs the bench extra)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks import peer  # noqa: E402
from pokesprite.config import load_params  # noqa: E402
from pokesprite.models.layers import CrossAttentionBlock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_params.yaml"


def n_params(model) -> int:
    return sum(q.numel() for q in model.parameters())


def test_the_unets_differ_only_by_our_attention_biases_and_do_the_same_work():
    p = load_params(TINY)
    ours, theirs = peer.unet_pair(p, torch.device("cpu"), geglu=False)
    # each block's self- and cross-attention have q, k and v biases of its width; diffusers' have none
    biases = sum(6 * m.proj_in.out_features for m in ours.model.modules() if isinstance(m, CrossAttentionBlock))
    assert n_params(ours.model) - n_params(theirs.model) == biases
    assert peer.gflops(ours) == pytest.approx(peer.gflops(theirs), rel=1e-6)


def test_the_matched_decoder_has_our_resnet_count_per_resolution():
    p = load_params(TINY)
    stock = peer.diffusers_vae(p, matched_decoder=False)
    matched = peer.diffusers_vae(p, matched_decoder=True)
    n = p.vae.model.num_res_blocks
    assert [len(b.resnets) for b in stock.decoder.up_blocks] == [n + 1] * len(p.vae.model.channels)
    assert [len(b.resnets) for b in matched.decoder.up_blocks] == [n] * len(p.vae.model.channels)
    for vae in (stock, matched):  # no mid-block attention: ours has none
        assert all(a is None for part in (vae.encoder, vae.decoder) for a in part.mid_block.attentions)


def test_one_run_writes_every_comparison(tmp_path):
    out = tmp_path / "peer.json"
    subprocess.run([sys.executable, "benchmarks/peer.py", "--params", str(TINY), "--threads", "1", "--warmup", "0",
                    "--repeats", "1", "--json", str(out)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"unet", "vae", "vae-matched"}
    for r in results.values():
        assert r["ours_s"] > 0 and r["diffusers_s"] > 0
        assert r["ratio"] == pytest.approx(r["diffusers_s"] / r["ours_s"])
    assert results["vae-matched"]["diffusers_gflops"] < results["vae"]["diffusers_gflops"]
