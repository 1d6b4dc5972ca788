"""The MVTec-AD folder layout: finding a category's images and masks, and decoding them.

<root>/<category>/train/good/*            normal training images
<root>/<category>/test/<type>/*           'good' (normal) or a defect type (anomalous)
<root>/<category>/ground_truth/<type>/<stem>_mask.png   pixel masks of the anomalous test images
"""
from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

from adtr_jax import errors
from adtr_jax.data import records

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
GOOD = 'good'
MASK_SUFFIX = '_mask'




def _entries(folder: pathlib.Path) -> list[pathlib.Path]:
  """Sorted entries of `folder`, hidden ones (.DS_Store, ._foo) left out."""
  return sorted(p for p in folder.iterdir() if not p.name.startswith('.'))


def images_in(folder: pathlib.Path) -> list[pathlib.Path]:
  """The image files directly in `folder`, sorted (hidden files left out)."""
  return [p for p in _entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def check_category(root: pathlib.Path, category: str) -> None:
  """An error naming the root or the category folder when either is missing; nothing is read."""
  if not (root / category).is_dir():
    raise _missing_category(root, category)


def _missing_category(root: pathlib.Path, category: str) -> errors.DataError:
  if not root.is_dir():
    return errors.DataError(f'dataset root {root} does not exist (category {category!r})')
  found = [p.name for p in _entries(root) if (p / 'train').is_dir()]
  return errors.DataError(f'category folder {root / category} does not exist; categories under {root}: '
                          f'{", ".join(found) or "none (no <category>/train folders)"}')


def _record(path: pathlib.Path, defect_type: str, mask_paths=()) -> dict:
  return records.record(path, defect_type != GOOD, defect_type, mask_paths)


def scan_good(folder: pathlib.Path) -> list[dict]:
  """The normal images of `folder`/good (train/, or a validation/ split), which holds nothing else."""
  if not folder.is_dir():
    raise errors.DataError(f'{folder} does not exist: a category needs {folder.name}/{GOOD}/ with normal '
                           'images')
  others = [p.name for p in _entries(folder) if p.name != GOOD]
  if others:
    raise errors.DataError(f'{folder} may only contain {GOOD}/ (it holds normal images only), '
                           f'found: {", ".join(others)}')
  images = images_in(folder / GOOD) if (folder / GOOD).is_dir() else []
  if not images:
    raise errors.DataError(f'{folder / GOOD} is missing or has no images ({", ".join(IMAGE_EXTENSIONS)})')
  return [_record(p, GOOD) for p in images]


def _masks_by_stem(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """'<stem>' -> path of '<stem>_mask.<ext>' in `folder` (empty if the folder is missing)."""
  if not folder.is_dir():
    return {}
  return {p.stem[:-len(MASK_SUFFIX)]: p for p in images_in(folder) if p.stem.endswith(MASK_SUFFIX)}


def scan_test(test: pathlib.Path, truth: pathlib.Path, require_masks: bool) -> list[dict]:
  """test/<type>/* with masks truth/<type>/<stem>_mask.* (a `truth` folder inside `test`, as MVTec AD 2
  has, is not a type)."""
  if not test.is_dir():
    raise errors.DataError(f'{test} does not exist: a category needs {test.name}/<type>/ folders')
  # Partial masks would silently count defects as normal pixels, so masks are all-or-nothing.
  need_masks = require_masks or truth.is_dir()
  records = []
  for folder in (p for p in _entries(test) if p.is_dir() and p != truth):
    masks = _masks_by_stem(truth / folder.name)
    for path in images_in(folder):
      if folder.name == GOOD:
        records.append(_record(path, GOOD))
      elif path.stem in masks:
        records.append(_record(path, folder.name, [masks[path.stem]]))
      elif need_masks:
        expected = truth / folder.name / f'{path.stem}{MASK_SUFFIX}.png'
        raise errors.DataError(f'anomalous test image {path} has no mask {expected}' +
                               (' (or, with no ground_truth folder at all, --config.dataset.require_masks=False for '
                                'image labels only)' if require_masks else
                                f' (delete {truth} to use image labels only)'))
      else:
        records.append(_record(path, folder.name))
  if not records:
    raise errors.DataError(f'the test split {test} has no images in {test.name}/<type>/ folders')
  return records


def category_dir(root, category: str) -> pathlib.Path:
  """<root>/<category>, resolved (so that records and prepared rows name files alike); an error
  listing the categories there when it is missing."""
  root = pathlib.Path(root).expanduser().resolve()
  if not category or not (root / category).is_dir():
    raise _missing_category(root, category)
  return root / category


def scan_category(root, category: str, require_masks: bool = True) -> records.Scan:
  """Lists a category's files: splits 'train' and 'test', sorted by defect type then name.

  Records (records.py) have no mask for normal images, nor for any image when the category has no
  ground_truth/ folder and require_masks=False. Raises errors.DataError naming the path of whatever
  is missing or misplaced.
  """
  cat = category_dir(root, category)
  return records.Scan(
      name=category, origin=f'mvtec {cat} (require_masks={require_masks})',
      splits={'train': scan_good(cat / 'train'),
              'test': scan_test(cat / 'test', cat / 'ground_truth', require_masks)})


def _open(data: bytes, path) -> Image.Image:
  """Fully decodes `data` (so truncated files fail here, not later)."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
  except Image.UnidentifiedImageError as e:  # its own message names a BytesIO object, not the file
    raise errors.DataError(f'cannot decode image {path}: not an image file (corrupt, or a format PIL '
                           'cannot read)') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.DataError(f'cannot decode image {path}: {e}') from e


def _read(path) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise errors.DataError(f'cannot read {path}: {e}') from e


def _to_uint8(image: Image.Image, path) -> Image.Image:
  """16- and 32-bit greyscale -> 8-bit 'L' (PIL's own conversion clips instead of scaling)."""
  if image.mode.startswith('I;16') or image.mode == 'I':
    wide = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
  if image.mode == 'F':
    raise errors.DataError(f'{path}: floating-point image mode {image.mode!r} is not supported')
  return image


def decode_image(data: bytes, path='<bytes>') -> np.ndarray:
  """Encoded image -> uint8 [H, W, 3] (greyscale repeated, alpha dropped, palette expanded)."""
  image = _to_uint8(_open(data, path), path)
  return np.asarray(image.convert('RGB'), dtype=np.uint8)


def decode_grey(data: bytes, path='<bytes>') -> np.ndarray:
  """Encoded greyscale (or colour, converted) image -> uint8 [H, W]."""
  image = _to_uint8(_open(data, path), path)
  return np.asarray(image.convert('L'), dtype=np.uint8)


def decode_mask(data: bytes, path='<bytes>', threshold: int = records.HALF) -> np.ndarray:
  """Encoded mask -> bool [H, W], True where the grey value is >= threshold (records.HALF: JPEG-era
  masks are not exactly 0/255; records.NONZERO for masks of defect ids)."""
  return decode_grey(data, path) >= threshold


def load_image(path) -> np.ndarray:
  """uint8 [H, W, 3]; errors.DataError naming `path` if it cannot be read or decoded."""
  return decode_image(_read(path), path)


def load_mask(path, threshold: int = records.HALF) -> np.ndarray:
  """bool [H, W] binarised at grey value `threshold`; errors.DataError naming `path` if unreadable."""
  return decode_mask(_read(path), path, threshold)


def load_grey(path) -> np.ndarray:
  """uint8 [H, W]; errors.DataError naming `path` if it cannot be read or decoded."""
  return decode_grey(_read(path), path)


def image_hw(path) -> tuple[int, int]:
  """An image file's (H, W), read from its header (the pixels are not decoded): its original size."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.DataError(f'cannot read image {path}: {e}') from e
  return height, width
