"""How many caption tokens should the text encoder keep (``text.max_tokens``)?

    python benchmarks/token_length.py [--lengths 32 64 128 256] [--index outputs/preprocess/index.csv]

For each candidate length L it measures, with the bundled all-MiniLM-L6-v2:

* coverage - the fraction of captions longer than L tokens (so truncated) and the mean fraction of
  each caption's word-piece tokens that survive truncation ([CLS]/[SEP] not counted);
* information kept - the validation captions (all captions if there is no split column) truncated
  to L are embedded (MiniLM in eval mode, mean pooling over the attention mask, L2-normalised) and
  matched against the embeddings of ALL captions kept whole (truncated at 256, longer than any
  caption); "top-1" is how often the truncated caption's nearest full caption is its own. Because
  every caption starts with the Pokemon's name, the same is repeated with the leading "Name; "
  removed from both sides ("top-1 w/o name"), which asks whether the description itself survives.
  "cos" is the mean cosine similarity between a truncated caption and its own full caption;
* cost - the text encoder's forward pass per caption padded to L (what stages 1-3 pay: the
  tokenizer pads to max_length), one U-Net training step (text projection + U-Net forward and
  backward at the params.yaml sizes, batch 16) with a context of L tokens, and the size of the
  cached float32 transformer features for the whole dataset. Each is given in GFLOP (counted by
  torch's FlopCounterMode: matmuls, convolutions, attention; exact and independent of machine load)
  and in wall time (the fastest of ``--reps`` repetitions, lengths interleaved; approximate on a
  shared machine).

Prints a markdown table. CPU, ``--threads`` torch threads (default 2); a few minutes on an idle
2-core machine, longer when the cores are shared.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pokesprite.config import TextConfig, UNetConfig, from_dict  # noqa: E402
from pokesprite.models.text import TextEncoder  # noqa: E402
from pokesprite.models.unet import UNet  # noqa: E402

FULL = 256  # longer than any caption (max ~206 MiniLM tokens): never truncates


def load_captions(index: Path, raw_dir: Path) -> tuple[list[str], list[str]]:
    """(captions, splits) from the preprocessed index, else the raw caption file cleaned (no splits)."""
    if index.is_file():
        with index.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [r["caption"] for r in rows], [r.get("split", "") for r in rows]
    from pokesprite.data import raw
    from pokesprite.data.preprocess import clean_caption

    captions = [clean_caption(c) for c in raw.read_captions(raw_dir / raw.CAPTIONS_FILE)]
    return captions, [""] * len(captions)


def load_sizes(path: Path) -> tuple[TextConfig, UNetConfig]:
    """Only the ``text`` and ``diffusion.unet`` sections of a params file (the rest is not needed here)."""
    raw = yaml.safe_load(path.read_text()) or {}
    return (from_dict(TextConfig, raw.get("text", {}), "text"),
            from_dict(UNetConfig, raw.get("diffusion", {}).get("unet", {}), "diffusion.unet"))


def strip_name(caption: str) -> str:
    head, sep, rest = caption.partition(";")
    return rest.strip() if sep and len(head) < 40 else caption


@torch.no_grad()
def embed(enc: TextEncoder, captions: list[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings of the captions truncated to ``max_length`` tokens."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # similar lengths -> less padding
    out = torch.empty(len(captions), enc.hidden)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        tok = enc.tokenizer([captions[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        h = enc.transformer(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        m = tok["attention_mask"][..., None].float()
        out[idx] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


def top1(queries: torch.Tensor, gallery: torch.Tensor, own: torch.Tensor) -> float:
    return ((queries @ gallery.T).argmax(1) == own).float().mean().item()


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gflops(fn) -> float:
    """Floating-point operations of one call (matmuls, convolutions, attention), in GFLOP."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="U-Net sizes and text.dim / text.model")
    ap.add_argument("--index", default=str(ROOT / "outputs/preprocess/index.csv"),
                    help="preprocessed captions with a split column (falls back to --raw)")
    ap.add_argument("--raw", default=str(ROOT.parent / "shared/pokemon"), help="raw dataset folder (fallback)")
    ap.add_argument("--split", default="val", help="query captions for retrieval (all if the split is absent)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N captions (a quick smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="U-Net training batch")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (the fastest is reported)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text_cfg, unet_cfg = load_sizes(Path(args.params))
    captions, splits = load_captions(Path(args.index), Path(args.raw))
    if args.limit:
        captions, splits = captions[:args.limit], splits[:args.limit]
    queries = [i for i, s in enumerate(splits) if s == args.split] or list(range(len(captions)))
    own = torch.tensor(queries)
    enc = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=FULL).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; text model {text_cfg.model!r}; "
          f"{len(captions)} captions, {len(queries)} retrieval queries "
          f"({args.split if len(queries) < len(captions) else 'all'})",
          flush=True)

    # coverage
    n_tok = torch.tensor([len(ids) - 2 for ids in enc.tokenizer(captions)["input_ids"]], dtype=torch.float)
    print(f"caption length in tokens (without [CLS]/[SEP]): median {n_tok.median():.0f}, "
          f"mean {n_tok.mean():.1f}, max {n_tok.max():.0f}", flush=True)

    # information kept
    t0 = time.perf_counter()
    gallery = embed(enc, captions, FULL)
    names_off = [strip_name(c) for c in captions]
    gallery_nn = embed(enc, names_off, FULL)
    print(f"full-caption embeddings: {time.perf_counter() - t0:.0f} s", flush=True)

    rows = {}
    for L in args.lengths:
        truncated = (n_tok > L - 2).float().mean().item()
        kept = (n_tok.clamp(max=L - 2) / n_tok).mean().item()
        if L >= FULL:  # nothing is truncated: the queries are the full captions themselves
            q, q_nn = gallery[own], gallery_nn[own]
        else:
            q = embed(enc, [captions[i] for i in queries], L)
            q_nn = embed(enc, [names_off[i] for i in queries], L)
        acc, acc_nn = top1(q, gallery, own), top1(q_nn, gallery_nn, own)
        cos = (q * gallery[own]).sum(1).mean().item()
        rows[L] = [truncated, kept, acc, acc_nn, cos]
        print(f"L={L}: retrieval done", flush=True)

    # cost: text-encoder forward on captions padded to L; one U-Net training step (text projection +
    # U-Net forward + backward). Lengths are interleaved within each repetition and the fastest
    # repetition is kept, so that load from other processes hits every length alike.
    unet = UNet(unet_cfg, context_dim=text_cfg.dim).train()
    proj = enc.proj.train()
    b = args.batch
    z = torch.randn(b, unet_cfg.latent_channels, 27, 27)
    t = torch.randint(0, 1000, (b,))
    time_caps = [captions[i] for i in queries[:16]]
    jobs = {}
    for L in args.lengths:
        tok = enc.tokenizer(time_caps, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        hidden = torch.randn(b, L, enc.hidden)
        mask = torch.zeros(b, L, dtype=torch.bool)
        for i, n in enumerate(n_tok[own[:b]].tolist()):  # real caption lengths; the rest is padding
            mask[i, :min(L, int(n) + 2)] = True

        def text_forward(tok=tok):
            with torch.no_grad():
                enc.transformer(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])

        def unet_step(hidden=hidden, mask=mask):
            unet.zero_grad(set_to_none=True)
            proj.zero_grad(set_to_none=True)
            (unet(z, t, proj(hidden), mask) - z).square().mean().backward()

        jobs[L] = (text_forward, unet_step)
        rows[L] += [gflops(text_forward) / len(time_caps), gflops(unet_step)]
    times = {L: ([], []) for L in args.lengths}
    for rep in range(args.reps + 1):  # repetition 0 is a warm-up
        for L, (text_forward, unet_step) in jobs.items():
            tt, tu = once(text_forward), once(unet_step)
            if rep:
                times[L][0].append(tt)
                times[L][1].append(tu)
        print(f"timing repetition {rep}/{args.reps} done", flush=True)
    for L in args.lengths:
        text_ms = min(times[L][0]) / len(time_caps) * 1e3
        rows[L] += [text_ms, min(times[L][1]), len(captions) * L * enc.hidden * 4 / 2**20]
    rows = [(L, *rows[L]) for L in args.lengths]

    base_len, base = rows[0][0], rows[0]
    print()
    print(f"| max_tokens | truncated | tokens kept (mean) | top-1 | top-1 w/o name | cos(trunc, full) "
          f"| text GFLOP/caption | text fwd ms/caption | U-Net step GFLOP (batch {b}) | U-Net fwd+bwd s/step "
          f"| U-Net GFLOP vs L={base_len} | feature cache MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L, tr, kept, acc, acc_nn, cos, text_gf, unet_gf, text_ms, unet_s, mb in rows:
        print(f"| {L} | {tr:.1%} | {kept:.1%} | {acc:.1%} | {acc_nn:.1%} | {cos:.3f} | {text_gf:.2f} | {text_ms:.1f} "
              f"| {unet_gf:.1f} | {unet_s:.2f} | {unet_gf / base[7]:.2f}x | {mb:.0f} |")

if __name__ == "__main__":
    main()
