"""Train `shapes-wan`: a Wan 2.1-architecture pipeline, small enough to train on two CPU cores,
that draws the scenes of `kinoray.models.scenes` from their captions.

Steps, each seeded:
1. Build the pipeline: a word-level tokenizer over the scenes' vocabulary, a frozen random UMT5
   encoder, `WanTransformer3DModel`, `AutoencoderKLWan` (Wan 2.1's 8x spatial, 4x temporal
   compression) and Wan's UniPC flow-matching scheduler.
2. Train the VAE on rendered clips (L1 + MSE on the decoder's unclamped output, a small KL term,
   the latent taken as the posterior mean plus small noise), then check its reconstruction per
   colour.
3. Encode a fixed set of clips, and write the latents' per-channel mean and std into the VAE's
   config (`latents_mean` / `latents_std`, which `WanPipeline` uses to normalise latents).
4. Train the transformer with Wan's rectified-flow objective: x_t = (1 - s) x_0 + s e, target
   e - x_0, s drawn uniformly then shifted like the scheduler's `flow_shift`; captions embedded by
   `WanPipeline.encode_prompt` exactly as at inference (padded to 16 tokens), 10% replaced by the
   empty prompt for classifier-free guidance; an EMA of the weights is what is saved.
5. Fine-tune the VAE's decoder alone on whole nine-frame clips (step 2 trains on windows of five
   frames, which never show it the third latent frame).
6. `save_pretrained`, plus the preset's request defaults and text length (`kinoray.json`), a
   training record (`training.json`: command, seed, steps, losses, timings) and `SHA256SUMS`.

Rectified flow: Liu et al., "Flow Straight and Fast" (2022); Esser et al., "Scaling Rectified
Flow Transformers" (2024). Wan's use of it: Wan 2.1 technical report (2025), section 3.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kinoray.models import scenes

NUM_FRAMES, SIZE = 9, 64
# Text tokens, padding included: captions are at most 11 tokens. The transformer attends to the
# padding, so inference must pad to the same length: the checkpoint declares it in kinoray.json,
# and plain diffusers callers pass `max_sequence_length=16`. (Wan's own 512 costs 3x per step.)
MAX_SEQUENCE_LENGTH = 16
FLOW_SHIFT = 3.0
CAPTION_DROPOUT = 0.1
# The first three latent channels are pulled toward the clip's colours pooled to the latent grid.
# Without it the encoder's gradient vanishes at the start (the decoder settles on the mean clip,
# the object being a tenth of the frame) and colour is the last thing the latents learn.
ANCHOR_WEIGHT = 0.5
# Decoding latents with noise added makes the decoder tolerant of a denoiser's small errors.
LATENT_NOISE = 0.05
Z_DIM = 16
VAE_WINDOW = 5


@dataclass(frozen=True)
class TrainSettings:
    """Step counts and sizes. The defaults take about 25 minutes on two CPU cores (see the
    checkpoint's `training.json` for the measured split)."""

    seed: int = field(default=0, metadata={"help": "seeds data, weights and noise"})
    vae_steps: int = field(default=1000, metadata={"help": "VAE optimiser steps"})
    vae_batch: int = field(default=8, metadata={"help": "clips (windows of 5 frames) per VAE step"})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE peak learning rate (one-cycle)"})
    clips: int = field(default=3000, metadata={"help": "clips encoded once as the transformer's data"})
    transformer_steps: int = field(default=8000, metadata={"help": "transformer optimiser steps"})
    # More, smaller steps learn motion sooner than fewer large ones at the same cost: at 4,000
    # steps of 32, held-out motion was 67% (lr 1e-3); at 8,000 steps of 16, 93%.
    transformer_batch: int = field(default=16, metadata={"help": "latent clips per transformer step"})
    transformer_lr: float = field(default=1e-3, metadata={"help": "transformer peak learning rate (cosine)"})
    ema_decay: float = field(default=0.999, metadata={"help": "decay of the saved EMA of the transformer"})
    decoder_steps: int = field(default=250, metadata={"help": "steps of the decoder on whole clips"})
    decoder_batch: int = field(default=4, metadata={"help": "whole clips per decoder step"})
    decoder_lr: float = field(default=5e-4, metadata={"help": "decoder learning rate (cosine)"})


Log = Callable[[str], None]


def build_pipeline(seed: int = 0) -> Any:
    """Step 1: the untrained pipeline (the text encoder stays as built: frozen and random)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    text_dim = 64
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def word_tokenizer() -> Any:
    """A word-level tokenizer over `scenes.VOCABULARY` (lower-cased, punctuation dropped; other
    words are <unk>)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *scenes.VOCABULARY]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # Punctuation separates words (it is not a word the model knows); "grey" is "gray".
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[^\w\s]"), " "),
            normalizers.Replace(Regex(r"\bgrey\b"), "gray"),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def clips_tensor(batch: list[scenes.Scene]) -> Any:
    """Rendered clips as the VAE takes them: float in [-1, 1], shape (B, 3, T, H, W)."""
    import torch

    frames = np.stack([s.render(NUM_FRAMES, SIZE, SIZE) for s in batch])
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def decode_unclamped(vae: Any, z: Any) -> Any:
    """`AutoencoderKLWan._decode` without its final clamp to [-1, 1], which would stop gradients."""
    import torch

    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        out.append(
            vae.decoder(
                x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
        )
    vae.clear_cache()
    return torch.cat(out, 2)


def pooled(x: Any) -> Any:
    """Clips (B, 3, 1 + 4k, H, W) averaged onto the Wan VAE's latent grid (B, 3, 1 + k, H/8, W/8):
    frame 0 alone, then groups of four frames, as its causal encoder compresses them."""
    import torch
    import torch.nn.functional as F

    rest = x[:, :, 1:]
    groups = rest.reshape(*rest.shape[:2], rest.shape[2] // 4, 4, *rest.shape[3:]).mean(3)
    return F.avg_pool3d(torch.cat([x[:, :, :1], groups], 2), (1, 8, 8))


def reconstruction_loss(x: Any, y: Any, batch: list[scenes.Scene]) -> Any:
    """L1 + MSE of decoded clips `y` against `x` (both (B, 3, T, H, W) in [-1, 1]). The object is a
    tenth of the frame: its pixels weigh 5x, so its colour is not traded for the background's."""
    import torch

    bg = torch.tensor([scenes.BACKGROUNDS[s.background] for s in batch]).float().div(127.5).sub(1.0)
    weight = 1.0 + 4.0 * ((x - bg.view(-1, 3, 1, 1, 1)).abs().sum(1, keepdim=True) > 0.3).float()
    return (weight * ((y - x).abs() + (y - x) ** 2)).mean()


def optimise(opt: Any, sched: Any, loss: Any) -> None:
    """One step: gradients of `loss`, clipped to norm 1 over the optimiser's parameters."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def train_vae(vae: Any, settings: TrainSettings, rng: np.random.Generator, log: Log) -> dict[str, float]:
    """Step 2. Returns the final losses and the PSNR of each colour's reconstruction."""
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, settings.vae_lr, total_steps=settings.vae_steps, pct_start=0.03
    )
    pairs = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]  # the VAE sees every pair
    vae.train()
    t0, recent = time.time(), []
    for step in range(settings.vae_steps):
        batch = [scenes.sample_scene(rng, pairs=pairs) for _ in range(settings.vae_batch)]
        # A random window of 1 + 4 frames: the causal VAE's first chunk and one cached chunk, at
        # about half the cost of the whole clip. (The cache of a cached chunk is then not trained;
        # nine-frame clips still reconstruct with their colour and motion.)
        start = int(rng.integers(0, NUM_FRAMES - VAE_WINDOW + 1))
        x = clips_tensor(batch)[:, :, start : start + VAE_WINDOW]
        h = vae._encode(x)
        mu, logvar = h.chunk(2, dim=1)
        z = mu + LATENT_NOISE * torch.randn_like(mu)
        y = decode_unclamped(vae, z)
        rec = reconstruction_loss(x, y, batch)
        kl = 0.5 * (mu**2 + logvar.clamp(-30, 20).exp() - 1 - logvar.clamp(-30, 20)).mean()
        loss = rec + 1e-4 * kl + ANCHOR_WEIGHT * ((mu[:, :3] - pooled(x)) ** 2).mean()
        optimise(opt, sched, loss)
        recent.append(float(rec.detach()))
        if (step + 1) % 100 == 0:
            log(
                f"vae step {step + 1}/{settings.vae_steps} rec {np.mean(recent[-100:]):.4f} ({time.time() - t0:.0f} s)"
            )
    vae.eval()
    return {"vae_rec_loss": float(np.mean(recent[-100:])), **colour_psnr(vae)}


def finetune_decoder(vae: Any, settings: TrainSettings, log: Log) -> dict[str, float]:
    """Step 5: the decoder alone on whole clips (the encoder, and so every latent the transformer
    learned, unchanged). Windows of five frames never show the decoder a chunk whose cache comes
    from a cached chunk: without this, frames 5-8 of a nine-frame clip decode with colour fringes.
    Seeded on its own, so it gives the same weights run after the transformer or resumed."""
    import torch

    torch.manual_seed(settings.seed + 3)
    rng = np.random.default_rng(settings.seed + 3)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.decoder_steps)
    pairs = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]
    vae.decoder.train()
    t0, recent = time.time(), []
    for step in range(settings.decoder_steps):
        batch = [scenes.sample_scene(rng, pairs=pairs) for _ in range(settings.decoder_batch)]
        x = clips_tensor(batch)
        with torch.no_grad():
            mu = vae._encode(x).chunk(2, dim=1)[0]
        y = decode_unclamped(vae, mu + LATENT_NOISE * torch.randn_like(mu))
        rec = reconstruction_loss(x, y, batch)
        optimise(opt, sched, rec)
        recent.append(float(rec.detach()))
        if (step + 1) % 50 == 0:
            log(
                f"decoder step {step + 1}/{settings.decoder_steps} rec {np.mean(recent[-50:]):.4f} "
                f"({time.time() - t0:.0f} s)"
            )
    vae.eval().requires_grad_(False)
    return {
        "decoder_rec_loss": float(np.mean(recent[-50:])),
        **{f"final_{k}": v for k, v in colour_psnr(vae).items()},
    }


def colour_psnr(vae: Any) -> dict[str, float]:
    """Reconstruction PSNR (dB) of the object's pixels, per colour, on 16 fresh clips each."""
    import torch

    out = {}
    rng = np.random.default_rng(12345)
    for colour in scenes.COLOURS:
        batch = [scenes.sample_scene(rng, pairs=[(colour, s) for s in scenes.SHAPES]) for _ in range(16)]
        x = clips_tensor(batch)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        bg = torch.stack([torch.tensor(scenes.BACKGROUNDS[s.background]) for s in batch]).float() / 127.5 - 1
        mask = ((x - bg.view(-1, 3, 1, 1, 1)).abs().sum(1, keepdim=True) > 0.3).expand_as(x)
        mse = float(((y - x) ** 2)[mask].mean())
        out[f"psnr_{colour}"] = round(10 * math.log10(4.0 / max(mse, 1e-10)), 2)
    return out


def set_latent_stats(vae: Any, latents: Any) -> None:
    """Step 3: per-channel mean and std of the encoded clips into the VAE's config."""
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(
        latents_mean=[round(float(v), 5) for v in mean], latents_std=[round(float(v), 5) for v in std]
    )


def encode_clips(vae: Any, batch: list[scenes.Scene]) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat(
            [vae.encode(clips_tensor(batch[i : i + 32])).latent_dist.mode() for i in range(0, len(batch), 32)]
        )


def train_transformer(
    pipe: Any, settings: TrainSettings, rng: np.random.Generator, log: Log
) -> dict[str, float]:
    """Step 4. Returns the final loss."""
    import torch

    data = [scenes.sample_scene(rng) for _ in range(settings.clips)]
    t0 = time.time()
    latents = encode_clips(pipe.vae, data)
    set_latent_stats(pipe.vae, latents)
    cfg = pipe.vae.config
    latents = (latents - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(
        cfg.latents_std
    ).view(1, -1, 1, 1, 1)
    log(f"encoded {len(data)} clips in {time.time() - t0:.0f} s")

    # Captions with and without the background phrase; "" is the unconditional prompt.
    captions = [[s.caption(True), s.caption(False)] for s in data]
    unique = sorted({c for pair in captions for c in pair} | {""})
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            unique, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu"
        )
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([[index[a], index[b]] for a, b in captions])

    model = pipe.transformer
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.transformer_lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / settings.transformer_steps)))
        ),
    )
    gen = torch.Generator().manual_seed(settings.seed)
    t0, recent = time.time(), []
    for step in range(settings.transformer_steps):
        idx = torch.randint(len(data), (settings.transformer_batch,), generator=gen)
        x0 = latents[idx]
        which = torch.randint(2, (len(idx),), generator=gen)
        cond = caption_ids[idx, which]
        drop = torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT
        cond = torch.where(drop, torch.full_like(cond, index[""]), cond)
        u = torch.rand(len(idx), generator=gen)
        sigma = FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(xt, timestep=sigma * 1000, encoder_hidden_states=embeds[cond], return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        optimise(opt, sched, loss)
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        recent.append(float(loss.detach()))
        if (step + 1) % 200 == 0:
            log(
                f"transformer step {step + 1}/{settings.transformer_steps} loss {np.mean(recent[-200:]):.4f} ({time.time() - t0:.0f} s)"
            )
    pipe.transformer = ema.eval()
    return {"transformer_loss": float(np.mean(recent[-200:]))}


def train(dest: Path, settings: TrainSettings, log: Log = print) -> dict[str, Any]:
    """Steps 1-6: train from scratch and write the checkpoint to `dest`. Returns the record."""
    import torch

    torch.manual_seed(settings.seed)
    torch.set_num_threads(torch.get_num_threads())
    rng = np.random.default_rng(settings.seed)
    started = time.time()
    pipe = build_pipeline(settings.seed)
    pipe.text_encoder.requires_grad_(False).eval()
    record: dict[str, Any] = {"settings": asdict(settings), "command": " ".join(["kinoray", *sys.argv[1:]])}
    t0 = time.time()
    record.update(train_vae(pipe.vae, settings, rng, log))
    record["vae_minutes"] = round((time.time() - t0) / 60, 1)
    log(
        "vae reconstruction PSNR by colour: "
        + ", ".join(f"{k[5:]} {v} dB" for k, v in record.items() if k.startswith("psnr_"))
    )
    pipe.vae.requires_grad_(False)
    t0 = time.time()
    record.update(train_transformer(pipe, settings, rng, log))
    record["transformer_minutes"] = round((time.time() - t0) / 60, 1)
    t0 = time.time()
    record.update(finetune_decoder(pipe.vae, settings, log))
    record["decoder_minutes"] = round((time.time() - t0) / 60, 1)
    record["total_minutes"] = round((time.time() - started) / 60, 1)
    save(pipe, dest, record)
    return record


CHECKSUMS = "SHA256SUMS"


def checksums(folder: Path) -> str:
    """`sha256sum`'s format over every file of the checkpoint but this one (`sha256sum -c` checks it)."""
    import hashlib

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    return "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n" for p in files
    )


def save(pipe: Any, dest: Path, record: dict[str, Any]) -> None:
    """Step 6: the diffusers folder, `kinoray.json` (request defaults and limits), `training.json`."""
    from kinoray.models import tiny

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # A pipeline loaded from disk remembers where it came from; the checkpoint need not.
    index = json.loads((tmp / "model_index.json").read_text())
    index.pop("_name_or_path", None)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / tiny.DEFAULTS_FILE).write_text(
        json.dumps(
            {
                "defaults": SHAPES_DEFAULTS,
                "limits": SHAPES_LIMITS,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
            },
            indent=2,
        )
        + "\n"
    )
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (tmp / CHECKSUMS).write_text(checksums(tmp))
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    tmp.rename(dest)


# What the model was trained for: 64 x 64, 9 frames at 8 fps. Larger sizes run, but are not what it
# learned; the limits allow up to 128 x 128 and 33 frames.
SHAPES_DEFAULTS = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "fps": 8,
    "num_inference_steps": 20,
    "guidance_scale": 3.0,  # the best of 2-7 by `kinoray eval` on the shipped weights
}
SHAPES_LIMITS = {"max_size": 128, "max_frames": 33}
