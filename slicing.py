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
    if os.path.isdir(path):
        raise ImageError(f"{path}: a folder, not an image file; pass an image in it")
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
    return overview, tiles(full, m, n, base), (m, n)


# ----------------------------------------------------------------------------------------------------------------
# the peers' tilers (train.py --tiler; docs/method.md#the-peers-tilers): other ways to cut the same image

TILERS = ("hires", "anyres", "overlap", "native")
OVERLAP_CROPS = 12  # the most crops of the overlap tiler (Molmo's max_crops)


def preprocess(img, tiler="hires", base=336, patch=14, max_slices=16, upscale=True, slices=True, tokens=0):
    """PIL image -> (overview, slices, grid) as `tiler` cuts it (HiResLLaVA.preprocess; HiResConfig.slicing holds
    a model's arguments); tokens: the native tiler's budget of LLM tokens."""
    if tiler == "anyres":
        return anyres_image(img, base, max_slices)
    if tiler == "overlap":
        return overlap_image(img, base, patch, OVERLAP_CROPS)
    if tiler == "native":
        return native_image(img, patch, tokens)
    return preprocess_image(img, base, max_slices, upscale, slices)


def grid_of(width, height, tiler="hires", base=336, patch=14, max_slices=16, upscale=True, slices=True, tokens=0):
    """The grid preprocess() gives an image of width x height, without cutting it (to count its tokens)."""
    if tiler == "anyres":
        W, H = select_best_resolution(width, height, anyres_resolutions(base, max_slices))
        return H // base, W // base, width, height
    if tiler == "overlap":
        return select_tiling(width, height, base - 2 * overlap_margin(base, patch), OVERLAP_CROPS)
    if tiler == "native":
        W, H = native_size(width, height, patch, tokens)
        return H // (2 * patch), W // (2 * patch)
    return slice_grid(width, height, base, max_slices, upscale) if slices else (0, 0)


def tiles(pixels, m, n, base):
    """(3, m*S, n*S) -> (m*n, 3, S, S), row-major."""
    return pixels.view(3, m, base, n, base).permute(1, 3, 0, 2, 4).reshape(m * n, 3, base, base)


def resize_and_pad(img, width, height, fill=(0, 0, 0)):
    """LLaVA-NeXT's resize_and_pad_image: img resized into width x height with its aspect ratio kept, centred on a
    canvas of `fill`."""
    scale = min(width / img.width, height / img.height)
    w, h = min(width, math.ceil(img.width * scale)), min(height, math.ceil(img.height * scale))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(img.resize((w, h), Image.BICUBIC), ((width - w) // 2, (height - h) // 2))
    return canvas


def anyres_resolutions(base, max_tiles):
    """LLaVA-NeXT's candidate canvases (its image_grid_pinpoints) as (width, height): every grid of 2 to max_tiles
    tiles of S x S (design choice: LLaVA-NeXT lists five of them for S = 336 and 4 tiles)."""
    return [(n * base, m * base) for m in range(1, max_tiles + 1) for n in range(1, max_tiles // m + 1) if m * n > 1]


def select_best_resolution(width, height, resolutions):
    """LLaVA-NeXT's select_best_resolution: the (width, height) among `resolutions` into which the image, resized
    with its aspect kept, keeps the most of its own pixels; ties to the one that wastes the least canvas."""
    best, best_key = None, None
    for w, h in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (w, h), key
    return best


def anyres_image(img, base, max_tiles):
    """LLaVA-NeXT's process_anyres_image: the best canvas of select_best_resolution, the image resized into it and
    padded (black, as upstream), cut into S x S tiles; the overview is the whole image resized to S x S.
    -> (overview (3,S,S), tiles (m*n,3,S,S), (m, n, width, height)): the image's own size, for hires.unpad."""
    img = to_rgb(img)
    W, H = select_best_resolution(img.width, img.height, anyres_resolutions(base, max_tiles))
    overview = to_tensor(img.resize((base, base), Image.BICUBIC))
    m, n = H // base, W // base
    return overview, tiles(to_tensor(resize_and_pad(img, W, H)), m, n, base), (m, n, img.width, img.height)


def overlap_margin(base, patch):
    """Molmo's crop margin: a sixth of the crop on each side, in whole patches (design choice; 16 px at S = 96 and
    56 px at S = 336)."""
    return patch * max(1, round(base / 6 / patch))


def select_tiling(width, height, interior, max_crops):
    """Molmo's select_tiling: the (rows, cols) of crop interiors whose canvas needs the least upscaling of the image,
    or, if every one must shrink it, the least downscaling."""
    tilings = [(r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops // r + 1)]
    scales = [min(c * interior / width, r * interior / height) for r, c in tilings]
    up = [(s, t) for s, t in zip(scales, tilings) if s >= 1]
    return min(up)[1] if up else max(zip(scales, tilings))[1]


def overlap_image(img, base, patch, max_crops):
    """Molmo's overlapping crops: the image resized and padded into rows x cols crop interiors of S - 2M, with a
    margin M of padding around the whole; crops of S x S at stride S - 2M then overlap by 2M, and the interiors
    (hires.encode_images drops every crop's margins after the ViT) cover the canvas exactly once.
    -> (overview (3,S,S), crops (m*n,3,S,S), (m, n))."""
    import torch
    img = to_rgb(img)
    M = overlap_margin(base, patch)
    interior = base - 2 * M
    m, n = select_tiling(img.width, img.height, interior, max_crops)
    canvas = Image.new("RGB", (n * interior + 2 * M, m * interior + 2 * M), (0, 0, 0))
    canvas.paste(resize_and_pad(img, n * interior, m * interior), (M, M))
    pixels = to_tensor(canvas)                                               # (3, m*I + 2M, n*I + 2M)
    crops = [pixels[:, r * interior:r * interior + base, c * interior:c * interior + base]
             for r in range(m) for c in range(n)]
    return to_tensor(make_overview(img, base)), torch.stack(crops), (m, n)


def native_size(width, height, patch, tokens):
    """Qwen2-VL's smart_resize at a token budget: the image's size scaled, aspect kept, to sides that are multiples
    of two patches, so that its 2 x 2-merged tokens come closest to `tokens` (design choice: Qwen2-VL bounds the
    pixels between a minimum and a maximum; a budget sets both)."""
    factor = 2 * patch
    scale = math.sqrt(tokens * factor * factor / (width * height))
    return (max(factor, round(width * scale / factor) * factor), max(factor, round(height * scale / factor) * factor))


def native_image(img, patch, tokens):
    """A native-resolution encoder's input (Qwen2-VL style): the whole image at native_size, no slices.
    -> (image (3, H, W), no slices, (H / 2p, W / 2p)): the grid of its 2 x 2-merged tokens."""
    img = to_rgb(img)
    W, H = native_size(img.width, img.height, patch, tokens)
    pixels = to_tensor(img.resize((W, H), Image.BICUBIC))
    return pixels, pixels.new_zeros(0, 3, H, W), (H // (2 * patch), W // (2 * patch))


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
    if os.path.isdir(args.png):
        ap.error(f"--png {args.png}: a folder; pass a file name, e.g. {os.path.join(args.png, 'slicing.png')}")
    if os.path.splitext(args.png)[1].lower() not in Image.registered_extensions():
        ap.error(f"--png {args.png}: no picture format has this extension; end the name with .png")
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
