"""Dynamic slicing (HiRes-LLaVA, arXiv 2407.08706, section 3.3): an image becomes a low-res overview plus an m x n
grid of base-resolution slices (docs/method.md#dynamic-slicing). hires.token_layout orders them for the LLM.

`python slicing.py --show IMAGE --png OUT.png` draws an image's overview and slice grid. Notation: m rows, n cols
of slices; S base resolution.
"""
import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw

# torch is imported in the two functions that make tensors (to_tensor, normalize): the picture of `python slicing.py
# --show` and its --help need none of torch's 2 s import.

# OpenAI CLIP preprocessing (open_clip's OPENAI_DATASET_MEAN/STD); images are RGB in [0, 1] before this.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OVERVIEW_PAD = tuple(int(255 * c) for c in CLIP_MEAN)  # (122, 116, 104): LLaVA's expand2square fill colour


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


def load_image(path):
    """Open an image file as RGB; ImageError naming the file if missing, empty, corrupt or unsupported."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: image file not found")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty (0-byte) image file")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image or unsupported image format") from None
    except Exception as e:  # truncated data, decompression bomb, codec errors...
        raise ImageError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {str(e)[:120]})") from None


def to_rgb(img):
    """Any PIL mode -> RGB. Integer/float modes are scaled to 8 bits (I;16 by /257, I and F min-max stretched),
    transparency is composited over white (design choices; LLaVA's plain convert('RGB') turns it black)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = a.min(), a.max()
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def slice_grid(width, height, base=336, max_slices=16, upscale=True):
    """(rows m, cols n) for a width x height image (paper 3.3): m = ceil(H/S), n = ceil(W/S); doubled when
    4mn <= N and upscale; if mn > N, the grid with mn <= N closest in log aspect ratio, ties to the larger mn
    (design choice)."""
    if width < 1 or height < 1 or max_slices < 1:
        raise ValueError(f"bad size {width}x{height} or max_slices {max_slices}")
    m, n = math.ceil(height / base), math.ceil(width / base)
    if upscale and 4 * m * n <= max_slices:
        m, n = 2 * m, 2 * n
    if m * n > max_slices:
        aspect = math.log(width / height)
        grids = [(r, c) for r in range(1, max_slices + 1) for c in range(1, max_slices // r + 1)]
        m, n = min(grids, key=lambda g: (abs(math.log(g[1] / g[0]) - aspect), -g[0] * g[1], g[0]))
    return m, n


def to_tensor(img):
    """RGB PIL image -> (3, H, W) uint8: 4x smaller than floats through DataLoader workers; normalize() on the
    device."""
    import torch
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


def normalize(pixels):
    """uint8 pixels (..., 3, S, S) -> CLIP-normalised float32 on their device."""
    import torch
    mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


def make_overview(img, base):
    """Pad to a square with the CLIP mean colour and resize to S x S (LLaVA 'pad'). We resize first, then pad, so a
    10000 x 100 image never allocates a 10000^2 canvas (design choice; differs from LLaVA only at the border)."""
    w, h = img.size
    scale = base / max(w, h)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (base, base), OVERVIEW_PAD)
    canvas.paste(small, ((base - small.width) // 2, (base - small.height) // 2))
    return canvas


def preprocess_image(img, base=336, max_slices=16, upscale=True, slices=True):
    """PIL image (any mode) -> (overview (3,S,S), slices (m*n,3,S,S) row-major, (m, n)), uint8 pixels; with
    slices=False the slices tensor is empty and the grid (0, 0)."""
    img = to_rgb(img)
    overview = to_tensor(make_overview(img, base))                          # (3, S, S)
    if not slices:
        return overview, overview.new_zeros(0, 3, base, base), (0, 0)
    m, n = slice_grid(img.width, img.height, base, max_slices, upscale)
    # resize to (n*S, m*S), aspect preserved as far as the grid allows, no padding (design choice)
    full = to_tensor(img.resize((n * base, m * base), Image.BICUBIC))      # (3, m*S, n*S)
    tiles = full.view(3, m, base, n, base).permute(1, 3, 0, 2, 4)          # (m, n, 3, S, S)
    return overview, tiles.reshape(m * n, 3, base, base), (m, n)


def draw_slicing(img, base=336, max_slices=16, upscale=True, kernel=2, display=360, patch=14):
    """Picture: overview (padded square) beside the resized image with its m x n slice grid and the token count."""
    img = to_rgb(img)
    m, n = slice_grid(img.width, img.height, base, max_slices, upscale)
    per_image = (base // patch // kernel) ** 2  # ViT token grid after the sampler
    tokens = (1 + m * n) * (per_image + 1)  # hires.token_layout: the overview and each slice, a separator after each
    cell = max(8, display // max(m, n))
    grid = img.resize((n * cell, m * cell), Image.BICUBIC)
    draw = ImageDraw.Draw(grid)
    for r in range(1, m):
        draw.line([(0, r * cell), (n * cell, r * cell)], fill=(255, 0, 0), width=2)
    for c in range(1, n):
        draw.line([(c * cell, 0), (c * cell, m * cell)], fill=(255, 0, 0), width=2)
    ov = make_overview(img, base).resize((cell * 2, cell * 2) if max(m, n) <= 2 else (display // 2,) * 2)
    pad, text_h = 12, 40
    out = Image.new("RGB", (ov.width + grid.width + 3 * pad, max(ov.height, grid.height) + 2 * pad + text_h),
                    "white")
    out.paste(ov, (pad, pad))
    out.paste(grid, (2 * pad + ov.width, pad))
    ImageDraw.Draw(out).text(
        (pad, out.height - text_h), f"{img.width}x{img.height} -> overview + {m}x{n} slices of {base}px; "
        f"{tokens} LLM tokens (k={kernel}, {per_image}/image + separators)", fill="black")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="HiRes-LLaVA slicing: draw an image's overview and slice grid.",
                                 usage=argparse.SUPPRESS)  # an error is one line, not a usage block above it
    ap.add_argument("--show", metavar="IMAGE", required=True, help="image file to slice")
    ap.add_argument("--png", default="slicing.png", help="output PNG path (default: slicing.png)")
    ap.add_argument("--base", type=int, default=336, help="slice / overview resolution S (default 336)")
    ap.add_argument("--max-slices", type=int, default=16, help="maximum number of slices N (default 16)")
    ap.add_argument("--no-upscale", action="store_true", help="do not double the grid of small images")
    ap.add_argument("--kernel", type=int, default=2, help="sampler kernel k, for the token count (default 2)")
    ap.add_argument("--patch", type=int, default=14, help="ViT patch size, for the token count (default 14)")
    args = ap.parse_args(argv)
    for flag in ("base", "max_slices", "kernel", "patch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.base % args.patch or (args.base // args.patch) % args.kernel:
        ap.error(f"--base {args.base}: must be a multiple of --patch {args.patch} whose patch grid "
                 f"{args.base // args.patch} --kernel {args.kernel} divides")
    try:
        img = load_image(args.show)
    except ImageError as e:
        raise SystemExit(f"slicing.py: error: {e}") from None
    try:
        draw_slicing(img, args.base, args.max_slices, not args.no_upscale, args.kernel, patch=args.patch).save(args.png)
    except (OSError, ValueError) as e:  # PIL: a folder that is not there, an unknown file extension
        raise SystemExit(f"slicing.py: error: --png {args.png}: cannot write the picture ({e})") from None
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
