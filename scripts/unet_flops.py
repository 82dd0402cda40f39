#!/usr/bin/env python3
"""Counts the floating-point operations of one SD 1.5 UNet forward, split the way a GPU profile
of `dragonedit bench --profile` splits its time: convolutions and linear layers (the matrix
products, `MatmulEntry`) against the attention cores (our flash kernel, `ForwardKernel`).
Multiply-adds count as two operations; norms, activations and additions are left out (a few
per cent of the total). docs/BENCHMARKS.md divides these by the profile's kernel times.

    python3 scripts/unet_flops.py [--latent 64] [--batch 1]
"""

import argparse

CHANNELS = (320, 640, 1280, 1280)
LAYERS = 2
TEXT_TOKENS, TEXT_WIDTH = 77, 768


def conv(c_in, c_out, pixels, k=3):
    return pixels * c_in * k * k * c_out


def resnet(c_in, c_out, pixels):
    shortcut = pixels * c_in * c_out if c_in != c_out else 0
    return conv(c_in, c_out, pixels) + conv(c_out, c_out, pixels) + shortcut


def transformer(c, tokens):
    """(multiply-adds in linear layers, in attention cores) of one transformer block."""
    # proj_in, q/k/v/out of self-attention, q/out of cross-attention, the GEGLU's 8c and 4c
    # products, proj_out: 20 c^2 per token; the text's keys and values once per block.
    linear = 20 * c * c * tokens + 2 * TEXT_TOKENS * TEXT_WIDTH * c
    # Scores and their product with the values, self- and cross-attention.
    cores = 2 * tokens * tokens * c + 2 * tokens * TEXT_TOKENS * c
    return linear, cores


def count(latent):
    convs = linear = cores = 0
    sizes = [latent * latent // 4**i for i in range(len(CHANNELS))]

    def block(c):
        nonlocal linear, cores
        lin, att = transformer(c, pixels)
        linear += lin
        cores += att

    convs += conv(4, CHANNELS[0], sizes[0])
    skips, c = [CHANNELS[0]], CHANNELS[0]
    for i, (width, pixels) in enumerate(zip(CHANNELS, sizes)):
        for _ in range(LAYERS):
            convs += resnet(c, width, pixels)
            c = width
            if i < len(CHANNELS) - 1:
                block(c)
            skips.append(c)
        if i < len(CHANNELS) - 1:
            convs += conv(c, c, sizes[i + 1])
            skips.append(c)
    pixels = sizes[-1]
    convs += 2 * resnet(c, c, pixels)
    block(c)
    for i, (width, pixels) in enumerate(zip(reversed(CHANNELS), reversed(sizes))):
        for _ in range(LAYERS + 1):
            convs += resnet(c + skips.pop(), width, pixels)
            c = width
            if i > 0:
                block(c)
        if i < len(CHANNELS) - 1:
            convs += conv(c, c, sizes[-i - 2])
    convs += conv(CHANNELS[0], 4, sizes[0])
    return convs, linear, cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (512 px: 64)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    convs, linear, cores = (2 * args.batch * m / 1e9 for m in count(args.latent))
    print(f"SD 1.5 UNet forward, {args.latent}x{args.latent} latent, batch {args.batch}, GFLOP:")
    print("| convolutions | linear layers | attention cores | total |")
    print("|---|---|---|---|")
    print(f"| {convs:.0f} | {linear:.0f} | {cores:.0f} | {convs + linear + cores:.0f} |")


if __name__ == "__main__":
    main()
