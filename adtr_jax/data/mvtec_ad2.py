"""MVTec AD 2, read where it lies.

<root>/<obj>/train/good/*.png                  normal training images
<root>/<obj>/validation/good/*.png             normal images held out by the benchmark
<root>/<obj>/test_public/{good,bad}/*.png      the public test set
<root>/<obj>/test_public/ground_truth/bad/<stem>_mask.png
<root>/<obj>/test_private/*.png, test_private_mixed/*.png   unlabelled (evaluation server only)

Splits: 'train', 'validation' (calibrates the decision threshold: datasets.load_category uses it as the
hold-out, so every training image trains) and 'test' (= test_public); the private sets are
Scan.unlabelled folders, scored by --mode=predict. Records (records.py) add nothing.
"""
from __future__ import annotations

from adtr_jax import errors
from adtr_jax.data import mvtec, records

OBJECTS = ('can', 'fabric', 'fruit_jelly', 'rice', 'sheet_metal', 'vial', 'wallplugs', 'walnuts')
PRIVATE_SPLITS = ('test_private', 'test_private_mixed')


def scan_category(root, category: str) -> records.Scan:
  cat = mvtec.category_dir(root, category)
  test = cat / 'test_public'
  unlabelled = {}
  for split in PRIVATE_SPLITS:
    if (cat / split).is_dir():
      if not mvtec.images_in(cat / split):
        raise errors.DataError(f'{cat / split} has no images ({", ".join(mvtec.IMAGE_EXTENSIONS)})')
      unlabelled[split] = str(cat / split)
  return records.Scan(
      name=category, origin=f'mvtec_ad2 {cat}',
      splits={'train': mvtec.scan_good(cat / 'train'), 'validation': mvtec.scan_good(cat / 'validation'),
              'test': mvtec.scan_test(test, test / 'ground_truth', require_masks=True)},
      unlabelled=unlabelled)
