r"""Runs the official evaluators beside adtr_jax.protocols on the same inputs and prints the differences.

  python experiments/official_metrics.py --workdir=/tmp/official \
      --loco=/path/to/mvtec_loco_ad_evaluation --mvtec_ad=/path/to/mvtec_ad_evaluation \
      --ad2_utils=/path/to/MVTecAD2_public_code_utils

The official code is never in this repository: obtain it and unpack it anywhere (docs/protocols.md
says where from, with sha256 sums). Each part runs when its path is given:
- --loco: the MVTec LOCO AD evaluator 2.0, (a) its command line (evaluate_experiment.py, adaptive
  thresholds) on a LOCO-layout tree of `protocol_cases.loco_case` (our TIFF maps, defect PNGs,
  defects_config.json), and (b) its own functions at every distinct score (ThresholdMetrics built by
  MetricsAggregator._refinement_callback with one threshold just below each distinct value), against
  protocols.loco_metrics;
- --mvtec_ad: MVTec AD's compute_pro (pro_curve_util.py) and trapezoid (generic_util.py) on TIFF maps
  and PNG masks of `protocol_cases.pro_case`, against metrics.pixel_metrics' AUPRO;
- ADEval (PyPI, test-only requirement): its command line (python -m adeval --sample_key_pat) on
  `protocol_cases.realiad_case` views, against protocols.sample_metrics;
- --ad2_utils: MVTec's check_and_prepare_data_for_upload.py on a full submission tree written by
  maps_io.write_ad2_submission (and on the tree less one file, which it must refuse);
- --real_run: the nearest-neighbour reference's maps of Magnetic Tile's test split (../shared/data),
  written as TIFFs at the model's resolution with the masks the project scores, through the official
  AU-PRO and LOCO sPRO (each connected defect region a defect with relative saturation 1.0, so sPRO is
  PRO) and ours; and at each image's original size, read back and checked.
--record writes the official figures to tests/protocol_reference.json (what the tests compare with).
"""
import contextlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adtr_jax import maps_io, metrics, protocols  # noqa: E402
from experiments import protocol_cases as cases  # noqa: E402

FLAGS = flags.FLAGS


@contextlib.contextmanager
def official_path(folder):
  """Imports from an official code folder (its modules are top-level: src, generic_util, ...)."""
  sys.path.insert(0, str(folder))
  try:
    yield
  finally:
    sys.path.remove(str(folder))


def _limit_key(x) -> str:
  return str(float(x))


# ------------------------------------------------------------------------------------------- LOCO
def write_loco_tree(case: dict, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """<root>/data/<obj>/{defects_config.json, ground_truth/<type>/<stem>/NNN.png} and
  <root>/maps/<obj>/test/<type>/<stem>.tiff (the official evaluator's layout). Returns (data, maps)."""
  data, maps = root / 'data', root / 'maps'
  obj = data / cases.LOCO_OBJECT
  obj.mkdir(parents=True, exist_ok=True)
  (obj / 'defects_config.json').write_text(json.dumps(case['config'], indent=1))
  for m, kind, stem, pngs in zip(case['maps'], case['types'], case['stems'], case['pngs']):
    maps_io.write_tiff(maps_io.map_path(maps, f'{cases.LOCO_OBJECT}/test/{kind}/{stem}.png'), m)
    for k, png in enumerate(pngs):
      path = obj / 'ground_truth' / kind / stem / f'{k:03d}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(png).save(path)
  return data, maps


def ours_loco(case: dict) -> dict:
  config = protocols.parse_defects_config(case['config'])
  channels = [protocols.loco_channels(p, config) for p in case['pngs']]
  return protocols.loco_metrics(list(case['maps']), channels, case['types'])


def official_loco_cli(loco_dir, data, maps, out) -> dict | str:
  """evaluate_experiment.py as a user runs it: its metrics.json, or its error's last line (on maps with
  few distinct scores its initial thresholds repeat and `binary_refinement` asserts)."""
  run = subprocess.run([sys.executable, 'evaluate_experiment.py', '--object_name', cases.LOCO_OBJECT,
                        '--dataset_base_dir', str(data), '--anomaly_maps_dir', str(maps), '--output_dir',
                        str(out)], cwd=loco_dir, capture_output=True, text=True)
  if run.returncode != 0:
    lines = [x.strip() for x in run.stderr.splitlines() if x.strip().strip('^~')]
    return f'failed: {" / ".join(lines[-2:])}'
  return json.loads((out / 'metrics.json').read_text())


def official_loco_exact(loco_dir, data, maps) -> dict:
  """The official functions with one threshold just below each distinct score (and one above all):
  its curve through every point, i.e. without the adaptive sampling's approximation."""
  with official_path(loco_dir):
    import evaluate_experiment as ee
    from src.aggregation import MetricsAggregator
    from src.image import DefectsConfig
    obj = pathlib.Path(data) / cases.LOCO_OBJECT
    config = DefectsConfig.create_from_list(json.loads((obj / 'defects_config.json').read_text()))
    test_dir = str(pathlib.Path(maps) / cases.LOCO_OBJECT / 'test')
    with contextlib.redirect_stdout(open(os.devnull, 'w')):
      gt_maps, anomaly_maps = ee.read_maps(str(obj / 'ground_truth'), test_dir, config)
      values = np.unique(np.concatenate([a.np_array.ravel() for a in anomaly_maps]).astype(np.float64))
      thresholds = np.r_[values[-1] + 1.0, np.nextafter(values, -np.inf)[::-1]]
      aggregator = MetricsAggregator(gt_maps, anomaly_maps)
      aggregator._refinement_callback(list(thresholds))
      spro = ee.get_auc_spro_results(aggregator.threshold_metrics, test_dir)
      auroc = ee.get_image_level_detection_metrics(gt_maps, anomaly_maps)
  return json.loads(json.dumps({'localization': spro, 'classification': auroc}))  # str keys, as the CLI


def loco_flat(result: dict) -> dict:
  """{'image_auroc/<type>': v, 'au_spro/<type>/<limit>': v} from ours or the official metrics.json."""
  out = {}
  if 'image_auroc' in result:  # ours
    for kind, v in result['image_auroc'].items():
      out[f'image_auroc/{kind}'] = v
    for kind, by_limit in result['au_spro'].items():
      for lim, v in by_limit.items():
        out[f'au_spro/{kind}/{_limit_key(lim)}'] = v
    return out
  for kind, v in result['classification']['auc_roc'].items():
    out[f'image_auroc/{kind}'] = v
  for kind, by_limit in result['localization']['auc_spro'].items():
    for lim, v in by_limit.items():
      out[f'au_spro/{kind}/{_limit_key(lim)}'] = v
  return out


def run_loco(loco_dir, workdir) -> list:
  records = []
  for params in cases.LOCO_CASES:
    case = cases.loco_case(**params)
    root = workdir / 'loco' / f'seed{params["seed"]}'
    data, maps = write_loco_tree(case, root)
    cli = official_loco_cli(loco_dir, data, maps, root / 'metrics')
    cli = loco_flat(cli) if isinstance(cli, dict) else cli
    exact = loco_flat(official_loco_exact(loco_dir, data, maps))
    ours = loco_flat(ours_loco(case))
    records.append({'case': params, 'distinct_scores': int(len(np.unique(case['maps']))),
                    'official_cli': cli, 'official_exact_thresholds': exact})
    _report(f'LOCO {params}', ours, {'cli': cli, 'exact thresholds': exact})
  return records


# ------------------------------------------------------------------------------------ MVTec AD PRO
def official_pro(mvtec_ad_dir, map_paths, mask_paths, limits) -> dict:
  """compute_pro + trapezoid(x_max=limit) / limit on maps read with tifffile and masks with PIL (as
  MVTec AD's evaluate_experiment.py reads them; a good image's mask is all zeros)."""
  with official_path(mvtec_ad_dir):
    import generic_util
    import pro_curve_util
    maps = [maps_io.read_tiff(p) for p in map_paths]
    gts = [np.asarray(Image.open(p)) if p else np.zeros(m.shape) for p, m in zip(mask_paths, maps)]
    with contextlib.redirect_stdout(open(os.devnull, 'w')):
      fprs, pros = pro_curve_util.compute_pro(anomaly_maps=maps, ground_truth_maps=gts)
    return {_limit_key(lim): float(generic_util.trapezoid(fprs, pros, x_max=lim) / lim) for lim in limits}


def write_pro_tree(maps, masks, root) -> tuple[list, list]:
  """TIFF maps and 0/255 PNG masks (None for a good image) under root."""
  map_paths, mask_paths = [], []
  for i, (m, mask) in enumerate(zip(maps, masks)):
    kind = 'bad' if mask.any() else 'good'
    map_paths.append(maps_io.write_tiff(maps_io.map_path(root / 'maps', f'obj/test/{kind}/{i:03d}.png'), m))
    if mask.any():
      path = root / 'gt' / f'{i:03d}_mask.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask.astype(np.uint8) * 255).save(path)
      mask_paths.append(path)
    else:
      mask_paths.append(None)
  return map_paths, mask_paths


def run_pro(mvtec_ad_dir, workdir) -> list:
  records = []
  for params in cases.PRO_CASES:
    case = cases.pro_case(**params)
    map_paths, mask_paths = write_pro_tree(case['maps'], case['masks'], workdir / 'pro' / f'seed{params["seed"]}')
    official = official_pro(mvtec_ad_dir, map_paths, mask_paths, cases.PRO_LIMITS)
    ours = {_limit_key(lim): metrics.pixel_metrics(case['maps'], case['masks'], lim)['pixel_aupro']
            for lim in cases.PRO_LIMITS}
    records.append({'case': params, 'official_au_pro': official})
    _report(f'AU-PRO {params}', ours, {'compute_pro + trapezoid': official})
  return records


# ------------------------------------------------------------------------------------------- ADEval
ADEVAL_MAIN = 'import numpy; numpy.trapz = numpy.trapezoid; import runpy; ' \
              'runpy.run_module("adeval", run_name="__main__", alter_sys=True)'


def official_adeval(case: dict, root: pathlib.Path) -> dict:
  """ADEval's command line on the views: tiny image files (it reads their size), a mask with one
  defect pixel for each anomalous view, 4 x 4 maps. numpy 2 dropped np.trapz, which ADEval 1.1.0
  calls: the wrapper restores it as the same function's new name (np.trapezoid)."""
  rng = np.random.default_rng(0)
  anomaps = {}
  for path, score, label in zip(case['paths'], case['scores'], case['labels']):
    image = root / 'images' / path
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(image, format='PNG')
    mask = None
    if label:
      mask_arr = np.zeros((4, 4), np.uint8)
      mask_arr[1, 2] = 255
      mask = root / 'masks' / pathlib.Path(path).with_suffix('.png')
      mask.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask_arr).save(mask)
      mask = str(mask)
    anomaps[str(image)] = (rng.random((4, 4)).astype(np.float32), float(score), mask)
  pkl = root / 'anomaps.pkl'
  pkl.write_bytes(pickle.dumps(anomaps))
  out = subprocess.run([sys.executable, '-c', ADEVAL_MAIN, str(pkl), '--sample_key_pat',
                        protocols.REALIAD_SAMPLE_PATTERN, '--expected_views_per_sample',
                        str(cases.REALIAD_VIEWS)], cwd=root, check=True, capture_output=True, text=True)
  line = [x for x in out.stdout.splitlines() if x.startswith(str(pkl))][-1]
  fields = line.split(',')[1:]
  return {k: float(v) for k, v in zip(fields[::2], fields[1::2])}


def run_adeval(workdir) -> list:
  records = []
  for params in cases.REALIAD_CASES:
    case = cases.realiad_case(**params)
    official = official_adeval(case, workdir / 'adeval' / f'seed{params["seed"]}_{len(records)}')
    ours_s = protocols.sample_metrics(case['scores'], case['labels'], case['sample_ids'], cases.REALIAD_VIEWS)
    ours_i = metrics.image_metrics(case['scores'], case['labels'])
    ours = {'s_auroc': ours_s['sample_auroc'], 'i_auroc': ours_i['image_auroc'],
            's_aupr (ours: AP)': ours_s['sample_ap'], 'i_aupr (ours: AP)': ours_i['image_ap']}
    theirs = {'s_auroc': official['s_auroc'], 'i_auroc': official['i_auroc'],
              's_aupr (ours: AP)': official['s_aupr'], 'i_aupr (ours: AP)': official['i_aupr']}
    records.append({'case': params, 'adeval': {k: official[k] for k in ('s_auroc', 's_aupr', 'i_auroc', 'i_aupr')}})
    for keys in (('s_auroc', 'i_auroc'), ('s_aupr (ours: AP)', 'i_aupr (ours: AP)')):
      _report(f'ADEval {params} {keys}', {k: ours[k] for k in keys}, {'adeval': {k: theirs[k] for k in keys}})
  return records


# ------------------------------------------------------------------------------------ AD 2 checker
def run_ad2_checker(ad2_dir, workdir) -> dict:
  """A full submission tree (4 x 4 maps written at 6 x 5) through MVTec's checker; then less one PNG."""
  tree = workdir / 'ad2' / 'submission'
  rng = np.random.default_rng(0)
  for obj, count in maps_io.AD2_PRIVATE_COUNTS.items():
    for split, suffix in maps_io.AD2_PRIVATE_SPLITS.items():
      names = [f'{i:03d}_{suffix}' for i in range(count)]
      maps_io.write_ad2_submission(tree, obj, split, names, rng.random((count, 4, 4)).astype(np.float32),
                                   [(6, 5)] * count, threshold=0.5)
  maps_io.check_ad2_submission(tree)
  run = lambda: subprocess.run([sys.executable, str(pathlib.Path(ad2_dir) / 'check_and_prepare_data_for_upload.py'),
                                str(tree)], cwd=tree.parent, capture_output=True, text=True)
  full = run()
  files = sum(1 for _ in tree.rglob('*') if _.is_file())
  victim = tree / 'anomaly_images_thresholded' / 'vial' / 'test_private' / '007_regular.png'
  victim.unlink()
  partial = run()
  print(f'AD 2 checker: full tree ({files} files) rc={full.returncode} '
        f'({"All checks successful" in full.stderr + full.stdout}); less one PNG rc={partial.returncode}: '
        f'{(partial.stderr.strip().splitlines() or [""])[-1][:160]}')
  return {'files': files, 'full_tree_accepted': full.returncode == 0 and 'All checks successful' in full.stderr,
          'tree_less_one_png_refused': partial.returncode != 0}


# ---------------------------------------------------------------------------------------- real run
def run_real(workdir, mvtec_ad_dir, loco_dir) -> dict:
  """Magnetic Tile through the nearest-neighbour reference (configs/magnetic_tile.py at 224 px)."""
  import runpy
  from adtr_jax.baselines import nearest_neighbour
  config = runpy.run_path(str(REPO / 'configs' / 'magnetic_tile.py'))['get_config']()
  config.dataset.cache_dir = str(workdir / 'cache')
  t = nearest_neighbour.score_test(config, 'magnetic_tile')
  maps, masks, labels = t['maps'], t['masks'].astype(bool), t['labels']
  root = workdir / 'real'
  out = {'num_images': int(len(maps)), 'size': list(maps.shape[1:])}
  # (a) The model's resolution: the maps and masks the project's own metrics use, as TIFF / PNG.
  map_paths, mask_paths = write_pro_tree(maps, masks, root / 'model_size')
  read_back = np.stack([maps_io.read_tiff(p) for p in map_paths])
  limits = (0.05, 0.3)
  ours = {_limit_key(lim): metrics.pixel_metrics(read_back, masks, lim)['pixel_aupro'] for lim in limits}
  if mvtec_ad_dir:
    official = official_pro(mvtec_ad_dir, map_paths, mask_paths, limits)
    out['au_pro'] = {'ours': ours, 'official': official}
    _report('real run AU-PRO', ours, {'compute_pro + trapezoid': official})
  if loco_dir:
    out['au_spro'] = run_real_loco(loco_dir, read_back, masks, labels, root / 'loco')
  # (b) Each image's original size: written, read back, compared with a direct resize.
  sizes = [Image.open(p).size[::-1] for p in t['paths']]
  rels = [f'magnetic_tile/{pathlib.Path(p).parent.name}/{pathlib.Path(p).name}' for p in t['paths']]
  written = maps_io.write_maps(root / 'original_size', rels, maps, sizes)
  worst = max(float(np.abs(maps_io.read_tiff(w) - maps_io.resize_map(m, s)).max())
              for w, m, s in zip(written, maps, sizes))
  ok = all(maps_io.read_tiff(w).shape == tuple(s) for w, s in zip(written, sizes))
  out['original_size'] = {'files': len(written), 'shapes_match': ok, 'max_abs_diff_read_back': worst}
  print(f'real run: {len(written)} original-size TIFFs, shapes match: {ok}, read-back difference {worst:g}')
  return out


def run_real_loco(loco_dir, maps, masks, labels, root) -> dict:
  """The LOCO evaluator on the real maps: each connected defect region one defect PNG (relative
  saturation 1.0, so sPRO = PRO); anomalous images alternate between the two LOCO types."""
  from scipy import ndimage
  config = [{'defect_name': 'region', 'pixel_value': 255, 'saturation_threshold': 1.0,
             'relative_saturation': True}]
  types, pngs, k = [], [], 0
  for mask in masks:
    if not mask.any():
      types.append('good')
      pngs.append([])
      continue
    types.append(protocols.LOCO_TYPES[k % 2])
    k += 1
    lab, num = ndimage.label(mask, structure=np.ones((3, 3)))
    pngs.append([np.where(lab == r, np.uint8(255), np.uint8(0)) for r in range(1, num + 1)])
  counters, stems = {}, []
  for kind in types:
    stems.append(f'{counters.get(kind, 0):03d}')
    counters[kind] = counters.get(kind, 0) + 1
  case = {'maps': maps, 'types': types, 'stems': stems, 'pngs': pngs, 'config': config}
  data, map_dir = write_loco_tree(case, root)
  ours = loco_flat(ours_loco(case))
  cli = official_loco_cli(loco_dir, data, map_dir, root / 'metrics')
  cli = loco_flat(cli) if isinstance(cli, dict) else cli
  _report('real run LOCO (sPRO = PRO here)', ours, {'cli': cli})
  per_type_pro = {}
  for kind in protocols.LOCO_TYPES:
    rows = [i for i, t in enumerate(types) if t in ('good', kind)]
    per_type_pro[kind] = metrics.pixel_metrics(maps[rows], masks[rows], 0.3)['pixel_aupro']
  print(f'  and metrics.pixel_metrics AUPRO@0.3 per type: {per_type_pro}')
  return {'ours': ours, 'official_cli': cli, 'pixel_aupro_0.3': per_type_pro}


# --------------------------------------------------------------------------------------------------
def _report(title: str, ours: dict, theirs: dict) -> None:
  print(f'== {title}')
  for name, values in theirs.items():
    if isinstance(values, str):
      print(f'  vs {name}: {values}')
      continue
    diffs = {k: abs(ours[k] - v) for k, v in values.items() if k in ours and v is not None}
    worst = max(diffs, key=diffs.get)
    print(f'  vs {name}: largest |ours - official| = {diffs[worst]:.3g} ({worst}: ours {ours[worst]:.9f}, '
          f'official {values[worst]:.9f})')


def sources() -> dict:
  """sha256 of every official file used (and ADEval's version), to say what the figures came from."""
  import hashlib
  from importlib import metadata
  out = {}
  for flag, names in (('loco', ('evaluate_experiment.py', 'src/aggregation.py', 'src/image.py', 'src/metrics.py',
                                'src/util.py')),
                      ('mvtec_ad', ('pro_curve_util.py', 'generic_util.py')),
                      ('ad2_utils', ('check_and_prepare_data_for_upload.py', 'utils.py'))):
    if getattr(FLAGS, flag):
      out[flag] = {n: hashlib.sha256((pathlib.Path(getattr(FLAGS, flag)) / n).read_bytes()).hexdigest()
                   for n in names}
  if FLAGS.adeval:
    out['adeval'] = metadata.version('adeval')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix='official_metrics_'))
  workdir.mkdir(parents=True, exist_ok=True)
  record = {}
  if FLAGS.loco:
    record['loco'] = run_loco(FLAGS.loco, workdir)
  if FLAGS.mvtec_ad:
    record['mvtec_pro'] = run_pro(FLAGS.mvtec_ad, workdir)
  if FLAGS.adeval:
    record['adeval'] = run_adeval(workdir)
  if FLAGS.ad2_utils:
    record['ad2_checker'] = run_ad2_checker(FLAGS.ad2_utils, workdir)
  if FLAGS.real_run:
    record['real_run'] = run_real(workdir, FLAGS.mvtec_ad, FLAGS.loco)
  record['sources'] = sources()
  (workdir / 'official_metrics.json').write_text(json.dumps(record, indent=1) + '\n')
  if FLAGS.record:
    path = pathlib.Path(FLAGS.record)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update({k: v for k, v in record.items() if k != 'real_run'})
    path.write_text(json.dumps(old, indent=1) + '\n')
    print(f'recorded the official figures in {path}')


if __name__ == '__main__':
  # Flags only for the command line: the tests import this module's functions.
  flags.DEFINE_string('workdir', None, 'Where the input trees and the official outputs are written.')
  flags.DEFINE_string('loco', None, 'The unpacked mvtec_loco_ad_evaluation folder (version 2.0).')
  flags.DEFINE_string('mvtec_ad', None, "A folder holding MVTec AD's pro_curve_util.py and generic_util.py.")
  flags.DEFINE_string('ad2_utils', None, "The folder of MVTec AD 2's check_and_prepare_data_for_upload.py.")
  flags.DEFINE_boolean('adeval', True, 'Run the ADEval comparison (needs the test requirements).')
  flags.DEFINE_boolean('real_run', False, 'Also compare on the maps of a real run (Magnetic Tile).')
  flags.DEFINE_string('record', None, 'Write the official figures to this JSON (tests/protocol_reference.json).')
  app.run(main)
