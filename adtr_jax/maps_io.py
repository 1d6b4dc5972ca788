"""Raw anomaly maps for the official evaluators: float TIFFs at each image's original size, in the
layout each evaluator reads, and MVTec AD 2's submission tree for its private test splits.

Layouts (the map's path mirrors the image's path under the benchmark root, suffix .tiff):
- MVTec LOCO AD (`evaluate_experiment.py`): <maps>/<obj>/test/<good|logical_anomalies|
  structural_anomalies>/<stem>.tiff;
- MVTec AD (`mvtec_ad_evaluation`): <maps>/<obj>/test/<defect>/<stem>.tiff;
- MVTec AD 2 public test (its dataset class, `mvtec_ad_2_public_offline.py`):
  <maps>/<obj>/test_public/<good|bad>/<stem>.tiff;
- MVTec AD 2 submission (`check_and_prepare_data_for_upload.py`): anomaly_images/<obj>/<split>/<stem>.tiff
  (float16) and anomaly_images_thresholded/<obj>/<split>/<stem>.png (0/255) for the splits test_private
  (<NNN>_regular) and test_private_mixed (<NNN>_mixed), every object, with exactly AD2_PRIVATE_COUNTS[obj]
  files in each split folder.

TIFFs are written with `tifffile` (what both MVTec evaluators read them with; PIL cannot write float16).
A map leaves the model at the model's size [S, S]; `resize_map` brings it back to the image's original
[H, W] by bilinear interpolation with half-pixel centres, edge-clamped and without antialiasing: the
numbers of `scoring.upsample_matrix` (jax.image.resize 'bilinear', antialias=False), the same operation
that took the map from the feature grid to [S, S].
"""
import pathlib
from collections.abc import Sequence

import numpy as np
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from adtr_jax import errors, protocols

AD2_PRIVATE_COUNTS = {'can': 321, 'fabric': 314, 'fruit_jelly': 255, 'rice': 277, 'sheet_metal': 142,
                      'vial': 276, 'wallplugs': 232, 'walnuts': 228}  # images per private split
AD2_PRIVATE_SPLITS = {'test_private': 'regular', 'test_private_mixed': 'mixed'}  # split: name suffix


def _linear_taps(n_in: int, n_out: int):
  """For each output position: the two input indices [n_out] and the weight of the second [n_out]."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo


def resize_map(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a score map [h, w] to size (H, W) -> float32 [H, W] (see the module docstring).
  A constant map stays constant; values stay within the map's range."""
  m = np.asarray(score_map, np.float64)
  if m.ndim != 2:
    raise ValueError(f'a score map is [h, w], got shape {m.shape}')
  height, width = int(size[0]), int(size[1])
  if height < 1 or width < 1:
    raise ValueError(f'size must be positive (H, W), got {size}')
  lo, hi, f = _linear_taps(m.shape[0], height)
  m = m[lo] * (1.0 - f)[:, None] + m[hi] * f[:, None]  # rows first: [H, w]
  lo, hi, f = _linear_taps(m.shape[1], width)
  return (m[:, lo] * (1.0 - f) + m[:, hi] * f).astype(np.float32)


def write_tiff(path, score_map: np.ndarray, dtype=np.float32) -> pathlib.Path:
  """A single-channel float TIFF (float32 or float16) of a map [H, W]; creates the parent folders.
  float16 needs every value within its finite range (|x| <= 65504), else ValueError."""
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float16):
    raise ValueError(f'TIFF maps are float32 or float16, not {dtype}')
  m = np.asarray(score_map)
  if m.ndim != 2:
    raise ValueError(f'a score map is [H, W], got shape {m.shape}')
  if not np.isfinite(m).all():
    raise ValueError(f'{path}: the map holds NaN or infinite values')
  if dtype == np.float16 and np.abs(m).max() > np.finfo(np.float16).max:
    raise ValueError(f'{path}: scores up to {np.abs(m).max():g} overflow float16 (max 65504); '
                     'rescale the maps before writing the submission')
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(path, m.astype(dtype), photometric='minisblack')
  return path


def read_tiff(path) -> np.ndarray:
  """A single-channel TIFF map -> [H, W] in its stored dtype. DataError if it is not 2-D."""
  m = tifffile.imread(path)
  if m.ndim != 2:
    raise errors.DataError(f'{path}: expected a single-channel map, got shape {m.shape}')
  return m


def map_path(out_dir, rel_image_path, suffix: str = '.tiff') -> pathlib.Path:
  """<out_dir>/<the image's path relative to the benchmark root, with `suffix`>: e.g. 'pushpins/test/
  good/000.png' -> <out_dir>/pushpins/test/good/000.tiff (the layouts in the module docstring)."""
  rel = pathlib.PurePath(rel_image_path)
  if rel.is_absolute() or '..' in rel.parts:
    raise ValueError(f'{rel_image_path}: expected a path relative to the benchmark root')
  return pathlib.Path(out_dir) / rel.with_suffix(suffix)


def write_maps(out_dir, rel_image_paths: Sequence[str], maps, sizes: Sequence[tuple[int, int]],
               dtype=np.float32) -> list[pathlib.Path]:
  """Each map [h, w] (maps: [N, h, w] or N arrays) resized to its image's original size (H, W) and
  written as a TIFF at `map_path(out_dir, rel_image_path)`. Returns the N paths."""
  if not len(rel_image_paths) == len(maps) == len(sizes):
    raise ValueError(f'{len(rel_image_paths)} paths, {len(maps)} maps, {len(sizes)} sizes')
  return [write_tiff(map_path(out_dir, rel), resize_map(m, size), dtype)
          for rel, m, size in tqdm(zip(rel_image_paths, maps, sizes), total=len(maps),
                                   desc='anomaly maps', unit='map', leave=False)]


def write_ad2_submission(out_dir, obj: str, split: str, names: Sequence[str], maps,
                         sizes: Sequence[tuple[int, int]], threshold: float) -> list[pathlib.Path]:
  """One object's private split of MVTec AD 2's submission tree under out_dir: `write_ad2_files` for
  each image name (its file stem, e.g. '000_regular'), map [h, w] and original size (H, W). Returns
  the TIFF paths. The file names and counts must be the checker's (see `check_ad2_submission`), else
  ValueError before anything is written.
  """
  _check_ad2_split_name(obj, split)
  expected = ad2_names(obj, split)
  if sorted(names) != sorted(expected) or len(names) != len(expected):
    raise ValueError(f'{obj}/{split}: the checker wants the {len(expected)} images {expected[0]}..'
                     f'{expected[-1]}, got {len(names)} names')
  if not len(names) == len(maps) == len(sizes):
    raise ValueError(f'{len(names)} names, {len(maps)} maps, {len(sizes)} sizes')
  return [write_ad2_files(out_dir, obj, split, name, m, size, threshold)
          for name, m, size in tqdm(zip(names, maps, sizes), total=len(names), desc=f'{obj}/{split}',
                                    unit='map', leave=False)]


def write_ad2_files(out_dir, obj: str, split: str, name: str, score_map: np.ndarray,
                    size: tuple[int, int], threshold: float) -> pathlib.Path:
  """One image of the submission tree: anomaly_images/<obj>/<split>/<name>.tiff (the map [h, w]
  resized to its original size (H, W), float16) and anomaly_images_thresholded/<obj>/<split>/<name>.png
  (uint8 0/255: the float16 map binarised by `protocols.binarize` at `threshold`). `name` must be one
  the checker wants in that folder (e.g. '000_regular' .. for test_private), else ValueError."""
  _check_ad2_split_name(obj, split)
  if name not in ad2_names(obj, split):
    raise ValueError(f'{obj}/{split}: {name!r} is not one of the images the checker wants '
                     f'({ad2_names(obj, split)[0]}..{ad2_names(obj, split)[-1]})')
  out_dir = pathlib.Path(out_dir)
  full = resize_map(score_map, size)
  path = write_tiff(out_dir / 'anomaly_images' / obj / split / f'{name}.tiff', full, np.float16)
  png = out_dir / 'anomaly_images_thresholded' / obj / split / f'{name}.png'
  png.parent.mkdir(parents=True, exist_ok=True)
  # Binarise what the server reads (the float16 map), so the two files agree pixel for pixel.
  Image.fromarray(protocols.binarize(full.astype(np.float16), threshold)).save(png)
  return path


def _check_ad2_split_name(obj: str, split: str) -> None:
  if obj not in AD2_PRIVATE_COUNTS:
    raise ValueError(f'{obj!r} is not an MVTec AD 2 object {sorted(AD2_PRIVATE_COUNTS)}')
  if split not in AD2_PRIVATE_SPLITS:
    raise ValueError(f'{split!r} is not a private split {sorted(AD2_PRIVATE_SPLITS)}')


def ad2_names(obj: str, split: str) -> list[str]:
  """The file stems MVTec's checker wants in <obj>/<split>/, sorted: 000_regular, 001_regular, ..."""
  return [f'{i:03d}_{AD2_PRIVATE_SPLITS[split]}' for i in range(AD2_PRIVATE_COUNTS[obj])]


def check_ad2_submission(root, objects: Sequence[str] = tuple(AD2_PRIVATE_COUNTS),
                         thresholded: bool = True) -> None:
  """The checks of MVTec's check_and_prepare_data_for_upload.py on a submission tree (objects: all
  eight for a submission; fewer to check part of one): anomaly_images/ (and, if thresholded,
  anomaly_images_thresholded/) hold exactly the objects, each exactly the two private splits, each
  exactly the files <NNN>_<regular|mixed>.tiff / .png for NNN < AD2_PRIVATE_COUNTS[obj], nothing else;
  TIFFs single-channel float16, PNGs single-channel with values in {0, 255}. Raises DataError naming
  the first offending path."""
  root = pathlib.Path(root)
  bases = _ad2_bases(thresholded)
  _same_entries(root, set(bases), dirs=True)
  for base in bases:
    _same_entries(root / base, set(objects), dirs=True)
    for obj in objects:
      _same_entries(root / base / obj, set(AD2_PRIVATE_SPLITS), dirs=True)
  for obj in objects:
    for split in AD2_PRIVATE_SPLITS:
      check_ad2_split(root, obj, split, thresholded)


def check_ad2_split(root, obj: str, split: str, thresholded: bool = True) -> None:
  """check_ad2_submission's checks of one object's split folder(s): anomaly_images/<obj>/<split>/
  (and anomaly_images_thresholded/<obj>/<split>/) hold exactly the files the checker wants, TIFFs
  single-channel float16, PNGs single-channel 0/255. DataError naming the first offending path."""
  root = pathlib.Path(root)
  bases = _ad2_bases(thresholded)
  for base, suffix in bases.items():
    folder = root / base / obj / split
    _same_entries(folder, {n + suffix for n in ad2_names(obj, split)}, dirs=False)
    for f in sorted(folder.iterdir()):
      if suffix == '.tiff':
        m = tifffile.imread(f)
        if m.ndim != 2 or m.dtype != np.float16:
          raise errors.DataError(f'{f}: expected a single-channel float16 map, got {m.dtype} {m.shape}')
      else:
        m = np.asarray(Image.open(f))
        if m.ndim != 2 or not np.isin(np.unique(m), (0, 255)).all():
          raise errors.DataError(f'{f}: expected a single-channel PNG with values 0 and 255')


def _ad2_bases(thresholded: bool) -> dict[str, str]:
  """The submission's top folders and their files' suffix."""
  return {'anomaly_images': '.tiff', **({'anomaly_images_thresholded': '.png'} if thresholded else {})}


def _same_entries(folder: pathlib.Path, wanted: set, dirs: bool) -> None:
  """folder holds exactly `wanted` (folders if dirs, else files), as the checker's
  compare_found_vs_required demands."""
  if not folder.is_dir():
    raise errors.DataError(f'{folder}: missing folder')
  found = {p.name for p in folder.iterdir() if (p.is_dir() if dirs else p.is_file())}
  others = {p.name for p in folder.iterdir()} - found
  kind = 'folders' if dirs else 'files'
  if found - wanted or others:
    raise errors.DataError(f'{folder}: unexpected entries {sorted((found - wanted) | others)[:4]}')
  if wanted - found:
    raise errors.DataError(f'{folder}: missing {kind} {sorted(wanted - found)[:4]} '
                           f'({len(wanted - found)} in all)')
