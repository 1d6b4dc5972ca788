"""Synthetic anomalies on numpy images, so the anomaly-aware losses can train without real defects.

Every generator maps (image, rng, **options) -> (image', mask):
- image: uint8 (values 0..255) or float (values in [0, 1]), [H, W, C] or [H, W]; never modified.
- image': a new array of the same shape and dtype, still in range.
- mask: bool [H, W], True exactly where the generator pasted or blended. A pasted value can equal the
  original at some pixels, so the pixels that changed are a subset of the mask.
- rng: an np.random.Generator (advanced in place) or an int seed; the same seed gives the same output.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from adtr_jax import errors

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Square:
  """One confetti square: top-left corner, side in pixels and fill value ([C], or a scalar for [H, W])."""
  row: int
  col: int
  side: int
  colour: np.ndarray


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _max_value(image: np.ndarray) -> float:
  """The top of the image's value range: 255 for uint8, 1 for floats."""
  if image.dtype == np.uint8:
    return 255.0
  if np.issubdtype(image.dtype, np.floating):
    return 1.0
  raise ValueError(f'synthetic anomalies need uint8 or float images, got dtype {image.dtype}')


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f'synthetic anomalies need an [H, W] or [H, W, C] image, got shape {image.shape}')
  _max_value(image)
  return image


def _check_range(name: str, value: Range, low: float) -> None:
  lo, hi = value
  if not low <= lo <= hi:
    raise ValueError(f'{name} must be a range (lo, hi) with {low} <= lo <= hi, got {value}')


def _to_dtype(values: np.ndarray, like: np.ndarray) -> np.ndarray:
  """float values -> like's dtype, clipped to its range (rounded for uint8)."""
  top = _max_value(like)
  if like.dtype == np.uint8:
    values = np.rint(values)
  return np.clip(values, 0.0, top).astype(like.dtype)


def confetti_squares(image: np.ndarray, rng: np.random.Generator | int,
                     num_squares: tuple[int, int] = (1, 6),
                     size: tuple[int, int] = (4, 16)) -> list[Square]:
  """The squares `confetti` pastes for this rng state (ranges inclusive; sides clipped to the image).

  Only the image's shape and dtype are read: [H, W, C] or [H, W].
  """
  image, rng = _check_image(image), _rng(rng)
  _check_range('confetti num_squares', num_squares, 1)
  _check_range('confetti size', size, 1)
  h, w = image.shape[:2]
  squares = []
  for _ in range(rng.integers(num_squares[0], num_squares[1] + 1)):
    side = int(min(rng.integers(size[0], size[1] + 1), h, w))
    row, col = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    if image.dtype == np.uint8:
      colour = rng.integers(0, 256, size=image.shape[2:]).astype(np.uint8)
    else:
      colour = rng.uniform(0.0, 1.0, size=image.shape[2:]).astype(image.dtype)
    squares.append(Square(row, col, side, colour))
  return squares


def confetti(image: np.ndarray, rng: np.random.Generator | int,
             num_squares: tuple[int, int] = (1, 6),
             size: tuple[int, int] = (4, 16)) -> tuple[np.ndarray, np.ndarray]:
  """Small solid-colour squares pasted at random places (they may overlap).

  Args:
    image: uint8 or float [H, W, C] / [H, W].
    num_squares, size: inclusive ranges of the square count and side in pixels.
  Returns:
    (image' like image, mask bool [H, W] = the union of the squares).
  """
  image = _check_image(image)
  out, mask = image.copy(), np.zeros(image.shape[:2], bool)
  for sq in confetti_squares(image, rng, num_squares, size):
    out[sq.row:sq.row + sq.side, sq.col:sq.col + sq.side] = sq.colour
    mask[sq.row:sq.row + sq.side, sq.col:sq.col + sq.side] = True
  return out, mask


def _two_places(n: int, rng: np.random.Generator) -> tuple[int, int]:
  """Two distinct indices in [0, n) (the same one when n == 1)."""
  src = int(rng.integers(n))
  dst = int(rng.integers(max(n - 1, 1)))
  return src, (dst + 1 if n > 1 and dst >= src else dst)


def cutpaste(image: np.ndarray, rng: np.random.Generator | int,
             area_fraction: Range = (0.02, 0.15), aspect: Range = (0.3, 3.3),
             jitter: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """A random rectangle of the image, colour-jittered, pasted at another random place.

  Args:
    image: uint8 or float [H, W, C] / [H, W].
    area_fraction: range of the rectangle's area over H*W.
    aspect: range of its height/width (sampled log-uniformly, so tall and wide are equally likely).
    jitter: brightness factor in [1 - jitter, 1 + jitter] and per-channel offset in +-jitter of the
      value range; 0 pastes the rectangle unchanged.
  Returns:
    (image' like image, mask bool [H, W] = the pasted rectangle).
  """
  image, rng = _check_image(image), _rng(rng)
  _check_range('cutpaste area_fraction', area_fraction, 0.0)
  _check_range('cutpaste aspect', aspect, 1e-6)
  h, w = image.shape[:2]
  area = rng.uniform(*area_fraction) * h * w
  ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
  ph = int(np.clip(np.rint(np.sqrt(area * ratio)), 1, h))
  pw = int(np.clip(np.rint(np.sqrt(area / ratio)), 1, w))
  # A distinct destination, so the paste moves content whenever the image leaves room to.
  src, dst = _two_places((h - ph + 1) * (w - pw + 1), rng)
  (r0, c0), (r1, c1) = divmod(src, w - pw + 1), divmod(dst, w - pw + 1)
  patch = image[r0:r0 + ph, c0:c0 + pw].astype(np.float64)
  if jitter > 0:
    offset = rng.uniform(-jitter, jitter, size=image.shape[2:]) * _max_value(image)
    patch = patch * rng.uniform(1.0 - jitter, 1.0 + jitter) + offset
  out, mask = image.copy(), np.zeros((h, w), bool)
  out[r1:r1 + ph, c1:c1 + pw] = _to_dtype(patch, image)
  mask[r1:r1 + ph, c1:c1 + pw] = True
  return out, mask


def _fade(t: np.ndarray) -> np.ndarray:
  """Perlin's 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at the cell edges."""
  return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int],
                 rng: np.random.Generator | int) -> np.ndarray:
  """2-D gradient (Perlin) noise, float64 [H, W] in about [-0.71, 0.71], with cells[0] x cells[1]
  lattice cells across the image."""
  rng = _rng(rng)
  (h, w), (cy, cx) = shape, cells
  angles = rng.uniform(0.0, 2.0 * np.pi, (cy + 1, cx + 1))
  gy, gx = np.sin(angles), np.cos(angles)
  y, x = (np.arange(h) + 0.5) * cy / h, (np.arange(w) + 0.5) * cx / w
  iy, ix = y.astype(int), x.astype(int)
  fy, fx = (y - iy)[:, None], (x - ix)[None, :]

  def corner(dy: int, dx: int) -> np.ndarray:
    """Dot product of the corner's gradient with the offset from that corner, [H, W]."""
    a, b = iy[:, None] + dy, ix[None, :] + dx
    return gy[a, b] * (fy - dy) + gx[a, b] * (fx - dx)

  sy, sx = _fade(fy), _fade(fx)
  top = corner(0, 0) + sx * (corner(0, 1) - corner(0, 0))
  bottom = corner(1, 0) + sx * (corner(1, 1) - corner(1, 0))
  return top + sy * (bottom - top)


def perlin_blend(image: np.ndarray, rng: np.random.Generator | int,
                 texture: np.ndarray | None = None, scale: tuple[int, int] = (1, 4),
                 threshold: float = 0.3, opacity: Range = (0.3, 1.0)) -> tuple[np.ndarray, np.ndarray]:
  """A texture blended into the image inside an irregular region: thresholded Perlin noise.

  Args:
    image: uint8 or float [H, W, C] / [H, W].
    texture: like image (same shape and dtype); None uses the image itself, flipped both ways and
      rolled by a random offset, so the region shows content from elsewhere in the image.
    scale: inclusive range of k, with 2^k noise cells per axis (larger k: smaller blobs).
    threshold: noise level above which a pixel is blended (lowered to the noise maximum if no
      pixel reaches it, so the mask is never empty).
    opacity: range of the texture's weight in the blend.
  Returns:
    (image' like image, mask bool [H, W] = the blended pixels).
  """
  image, rng = _check_image(image), _rng(rng)
  _check_range('perlin_blend scale', scale, 0)
  _check_range('perlin_blend opacity', opacity, 0.0)
  h, w = image.shape[:2]
  if texture is None:
    texture = np.roll(np.flip(image, (0, 1)), (rng.integers(h), rng.integers(w)), axis=(0, 1))
  elif texture.shape != image.shape or texture.dtype != image.dtype:
    raise ValueError(f'perlin_blend texture {texture.shape} {texture.dtype} must match the image '
                     f'{image.shape} {image.dtype}')
  cells = 2 ** rng.integers(scale[0], scale[1] + 1, size=2)
  noise = perlin_noise((h, w), (int(cells[0]), int(cells[1])), rng)
  mask = noise >= min(threshold, noise.max())
  beta = rng.uniform(*opacity)
  blended = (1.0 - beta) * image.astype(np.float64) + beta * texture.astype(np.float64)
  out = image.copy()
  out[mask] = _to_dtype(blended[mask], image)
  return out, mask


AnomalyFn = Callable[..., tuple[np.ndarray, np.ndarray]]
GENERATORS: dict[str, AnomalyFn] = {'confetti': confetti, 'cutpaste': cutpaste, 'perlin': perlin_blend}


def make_anomaly(name: str, image: np.ndarray,
                 seed: int | np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """GENERATORS[name] with default options: image [H, W, C] / [H, W] -> (image', mask bool [H, W])."""
  if name not in GENERATORS:
    raise errors.ConfigError(f'unknown synthetic anomaly {name!r} (config field anomalies.synthetic); '
                             f'valid names: {", ".join(GENERATORS)}')
  return GENERATORS[name](image, seed)
