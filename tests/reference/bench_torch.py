"""The PyTorch side of `dragonedit bench`: the same workloads with diffusers' UNet (SDPA
attention), timed the same way, so one script on the GPU machine gives both columns.

    python tests/reference/bench_torch.py --dtype fp16 --json out.json        # SD 1.5 size, CUDA
    python tests/reference/bench_torch.py --tiny --device cpu --resolution 128 --steps 4

Rows (names match `dragonedit bench`):
- UNet forward at batch 1 and batch 2 (one CFG step);
- one guidance evaluation: the UNet stopped after up_blocks.2, for a batch of two latents that
  need gradients, an energy on the up_blocks.1/2 features against a reference pass without
  gradients, and the backward to the latents (ALGORITHM.md §3, §5.7);
- DDIM inversion of N steps (ALGORITHM.md §2.1);
- an edit-shaped workload: VAE encode, N inversion steps, N CFG steps of which the first
  `0.6 N` are guided, VAE decode. It has the UNet and VAE passes of a 'D' edit but no memory
  bank (its K/V injection needs the official attention processors), so it is a lower bound for
  the official release's time, not a replacement for it.
Weights are random (timing does not depend on values). Peak memory is
torch.cuda.max_memory_allocated per row, reset before each row.
"""

import argparse
import json
import pathlib
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

ROOT = pathlib.Path(__file__).resolve().parents[2]

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def tiny_configs():
    def read(component):
        config = json.loads((ROOT / "tests/fixtures/tiny-sd" / component / "config.json").read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return read("unet"), read("vae")


def up_features(unet, latent, t, context, last=2):
    """UNet2DConditionModel.forward stopped after up block `last`: every up block's output."""
    timesteps = torch.full((latent.shape[0],), t, device=latent.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(latent.dtype))
    x = unet.conv_in(latent)
    skips = (x,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=context)
        else:
            x, res = block(hidden_states=x, temb=emb)
        skips += res
    if unet.mid_block is not None:
        x = unet.mid_block(x, emb, encoder_hidden_states=context)
    outputs = []
    for i, block in enumerate(unet.up_blocks[: last + 1]):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if skips else None
        if getattr(block, "has_cross_attention", False):
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=context, upsample_size=size)
        else:
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        outputs.append(x)
    return outputs


def check_truncation(unet, latent, context):
    """The truncated forward must reproduce the full forward's up-block outputs."""
    seen = {}
    hooks = [unet.up_blocks[i].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (1, 2)]
    with torch.no_grad():
        unet(latent, 981, encoder_hidden_states=context)
        ours = up_features(unet, latent, 981, context)
    for h in hooks:
        h.remove()
    for i in (1, 2):
        err = (ours[i] - seen[i]).abs().max().item()
        assert err <= 1e-3 * seen[i].abs().max().item(), f"up_blocks.{i} differs by {err}"


def guidance(unet, z, reference, t, context):
    """One guidance evaluation: gradients of a cosine-similarity energy on the up_blocks.1/2
    features with respect to a batch of two latents (edit and content rows)."""
    with torch.no_grad():
        refs = up_features(unet, reference, t, context[:1])
    leaf = z.repeat(2, 1, 1, 1).detach().requires_grad_(True)
    gens = up_features(unet, leaf, t, context[:1].repeat(2, 1, 1))
    energy = sum(
        (1 - torch.nn.functional.cosine_similarity(gens[i].float(), refs[i].float().expand_as(gens[i]), dim=1)).mean()
        for i in (1, 2)
    )
    (grad,) = torch.autograd.grad(energy, leaf)
    return grad


def alphas(device):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(device)


def invert(unet, z, context, steps, a):
    stride = 1000 // steps
    for k in range(steps):
        t = 1 + stride * k
        lower = a[t - stride] if t - stride >= 0 else a[0]
        eps = unet(z, t, encoder_hidden_states=context).sample
        x0 = (z - (1 - lower).sqrt() * eps) / lower.sqrt()
        z = (a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps).to(z.dtype)
    return z


def edit_shaped(unet, vae, image, context, steps, a):
    z0 = vae.encode(image).latent_dist.mean * 0.18215
    z = invert(unet, z0, context[1:], steps, a)
    stride = 1000 // steps
    guided = int(0.6 * steps)
    for i in range(steps):
        t = (steps - 1 - i) * stride + 1
        if i < guided:
            with torch.enable_grad():
                g = guidance(unet, z, z, t, context[1:])
        u, c = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
        eps = u + 4.0 * (c - u)
        if i < guided:
            eps = eps + g[:1].to(eps.dtype)
        prev = a[t - stride] if t - stride >= 0 else a[0]
        x0 = (z - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        z = (prev.sqrt() * x0 + (1 - prev).sqrt() * eps).to(z.dtype)
    return vae.decode(z / 0.18215).sample


def measure(name, device, runs, fn):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()  # warm-up: cuDNN/SDPA algorithm choice, allocator growth
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"workload": name, "median_ms": statistics.median(times), "fastest_ms": min(times),
            "peak_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--tiny", action="store_true", help="the tiny test model's configuration")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--skip-edits", action="store_true")
    p.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    torch.manual_seed(0)
    unet_config, vae_config = tiny_configs() if args.tiny else (SD15_UNET, SD15_VAE)
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).eval()
    vae = AutoencoderKL(**vae_config).to(device, dtype).eval()
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA, as the official release's xformers
    side = args.resolution // 8
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, side, side, generator=gen).to(device, dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)
    image = torch.rand(1, 3, args.resolution, args.resolution, generator=gen).to(device, dtype) * 2 - 1
    a = alphas(device)
    check_truncation(unet, z, context[:1])

    rows = []
    with torch.no_grad():
        rows.append(measure(f"UNet forward, batch 1, {side}x{side} latent", device, args.runs,
                            lambda: unet(z, 981, encoder_hidden_states=context[1:])))
        rows.append(measure(f"UNet forward, batch 2 (CFG), {side}x{side}", device, args.runs,
                            lambda: unet(torch.cat([z, z]), 981, encoder_hidden_states=context)))
    with torch.enable_grad():
        rows.append(measure("guidance: truncated UNet forward + backward", device, args.runs,
                            lambda: guidance(unet, z, z, 981, context[1:])))
    with torch.no_grad():
        rows.append(measure(f"DDIM inversion, {args.steps} steps", device, args.runs,
                            lambda: invert(unet, z, context[1:], args.steps, a)))
        if not args.skip_edits:
            rows.append(measure(
                f"edit-shaped workload, no memory bank ({args.steps} steps, {args.resolution} px)",
                device, args.runs, lambda: edit_shaped(unet, vae, image, context, args.steps, a)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_torch: {name}, torch {torch.__version__}, {args.dtype}, "
          f"{'tiny' if args.tiny else 'SD 1.5'} random weights, {args.runs} runs after a warm-up\n")
    print("| workload | median ms | fastest ms | peak MiB |")
    print("|---|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['workload']} | {r['median_ms']:.1f} | {r['fastest_ms']:.1f} | {peak} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "dtype": args.dtype, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
