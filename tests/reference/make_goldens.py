"""Golden outputs from stock diffusers and transformers for the Rust parity tests.

The fixtures in tests/fixtures/<mode>/ come from the official DragonDiffusion code (diffusers
0.18). This script checks the same models against current releases, pinned in
requirements.txt, and covers what the official run never touched: the CLIP tokenizer on a wider
prompt set, a non-square latent (the UNet's skip-size upsampling), DDIMScheduler sampling with
classifier-free guidance, the schedule at other step counts, and a BK-SDM-Tiny-shaped UNet
(three stages, one layer per block, no mid block) loaded through the same code.

    python tests/reference/make_goldens.py                 # rewrite tests/fixtures/diffusers
    python tests/reference/make_goldens.py --build-bk      # also rebuild tests/fixtures/tiny-bk

Everything runs on the CPU in float32 on one thread, so two runs give identical files.
"""

import argparse
import json
import pathlib
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_SD = FIXTURES / "tiny-sd"
TINY_BK = FIXTURES / "tiny-bk"
OUT = FIXTURES / "diffusers"

# ASCII prompts that exercise the tokenizer's pre-split pattern: contractions, digits (split one
# by one), punctuation runs, case, repeated whitespace, and a prompt long enough to be cut at 77.
PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a red cup on a wooden table",
    "don't stop; it's the dog's toy, isn't it?",
    "2 apples + 13 pears = $100 (or 99.5%)",
    "  spaced\tout\nwords   here  ",
    "a high-resolution, ultra-detailed photograph!!! #nature @dawn",
    "state-of-the-art text-to-image diffusion & co.",
    " ".join(["a very long prompt about a small house by the lake"] * 10),
]

# Prompts whose text-encoder hidden states are checked (index 0 is the unconditional prompt).
ENCODED = ["", "a photo of a cat", "a red cup on a wooden table"]

TIMESTEPS = [981, 941, 901]
LATENT_HW = (8, 12)  # non-square and not a multiple of 8: the decoder upsamples to skip sizes
GUIDANCE = 7.5
STEPS = 50
STEP_COUNTS = [7, 10, 20, 25, 30, 50]


def seeded_normal(seed, shape):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_image(h, w):
    """A smooth deterministic RGB pattern in [-1, 1], [1, 3, h, w]."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack(
        [np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * x * y + 1)], axis=0
    )
    return torch.from_numpy((0.9 * rgb)[None].astype(np.float32))


def save(name, **arrays):
    np.savez(OUT / name, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})


def build_bk(seed=7):
    """A tiny UNet with BK-SDM-Tiny's topology, weights rounded to float16 like tiny-sd's."""
    config = json.loads((TINY_SD / "unet" / "config.json").read_text())
    for key in [k for k in config if k.startswith("_")]:
        del config[key]
    config.update(
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3,
        layers_per_block=1,
        mid_block_type=None,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    if TINY_BK.exists():
        shutil.rmtree(TINY_BK)
    unet.half().save_pretrained(TINY_BK / "unet", safe_serialization=True)


def load_unet(folder):
    return UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()


def tokens(tokenizer):
    ids = {p: tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS}
    (OUT / "tokens.json").write_text(json.dumps(ids, indent=1) + "\n")


def unet_outputs(unet, context, name, with_features):
    """ε at TIMESTEPS for a batch of 2 (unconditional, prompt), and up_blocks.1/2 outputs."""
    x = seeded_normal(1, (2, 4) + LATENT_HW)
    features = {}
    hooks = [
        unet.up_blocks[i].register_forward_hook(lambda m, a, out, i=i: features.__setitem__(i, out))
        for i in (1, 2)
    ] if with_features else []
    out = {"x": x}
    for t in TIMESTEPS:
        out[f"eps_{t}"] = unet(x, t, encoder_hidden_states=context).sample
        for i in features:
            out[f"up{i}_{t}"] = features[i]
    for h in hooks:
        h.remove()
    save(name, **out)


def invert(unet, scheduler, z0, context, steps):
    """ALGORITHM.md §2.1: ε at the target level t, x̂0 from the lower level t - stride."""
    stride = scheduler.config.num_train_timesteps // steps
    a = scheduler.alphas_cumprod
    latents = [z0]
    z = z0
    for t in reversed(scheduler.timesteps.tolist()):
        lower = t - stride
        a_lower = a[lower] if lower >= 0 else scheduler.final_alpha_cumprod
        eps = unet(z, t, encoder_hidden_states=context).sample
        x0 = (z - (1 - a_lower).sqrt() * eps) / a_lower.sqrt()
        z = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps
        latents.append(z)
    return torch.cat(latents)


def sample(unet, scheduler, z, context, guidance):
    """Stock DDIMScheduler sampling (eta 0); CFG over (unconditional, prompt) unless g = 1."""
    for t in scheduler.timesteps:
        if guidance == 1.0:
            eps = unet(z, t, encoder_hidden_states=context[1:]).sample
        else:
            u, c = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
            eps = u + guidance * (c - u)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-bk", action="store_true", help="rebuild tests/fixtures/tiny-bk first")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    if args.build_bk:
        build_bk()
    OUT.mkdir(exist_ok=True)

    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    tokens(tokenizer)
    text_encoder = CLIPTextModel.from_pretrained(TINY_SD / "text_encoder", torch_dtype=torch.float32).eval()
    ids = tokenizer(ENCODED, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(ids).last_hidden_state
    save("text.npz", hidden=hidden)
    context = hidden[:2]  # ("", "a photo of a cat")

    unet = load_unet(TINY_SD)
    unet_outputs(unet, context, "unet.npz", with_features=True)
    unet_outputs(load_unet(TINY_BK), context, "unet_bk.npz", with_features=False)

    vae = AutoencoderKL.from_pretrained(TINY_SD / "vae", torch_dtype=torch.float32).eval()
    h, w = (8 * s for s in LATENT_HW)
    image = test_image(h, w)
    latent = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    decode_in = seeded_normal(2, (1, 4) + LATENT_HW)
    decoded = vae.decode(decode_in / vae.config.scaling_factor).sample
    save("vae.npz", image=image, latent=latent, decode_in=decode_in, decoded=decoded)

    scheduler = DDIMScheduler.from_pretrained(TINY_SD / "scheduler")
    schedule = {}
    for n in STEP_COUNTS:
        scheduler.set_timesteps(n)
        schedule[n] = scheduler.timesteps.tolist()
    (OUT / "schedule.json").write_text(json.dumps({
        "timesteps": schedule,
        "alphas_cumprod": scheduler.alphas_cumprod.tolist(),
        "final_alpha_cumprod": float(scheduler.final_alpha_cumprod),
    }) + "\n")

    scheduler.set_timesteps(STEPS)
    z_t = seeded_normal(3, (1, 4) + LATENT_HW)
    generated = sample(unet, scheduler, z_t, context, GUIDANCE)
    latents = invert(unet, scheduler, latent, context[1:], STEPS)
    reconstructed = sample(unet, scheduler, latents[-1:], context, 1.0)
    save("ddim.npz", z_t=z_t, generated=generated, inversion=latents, reconstructed=reconstructed)

    (OUT / "versions.json").write_text(json.dumps({
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
