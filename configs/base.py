"""The base configuration: every key any config may set, with its default.

Override files import ``get_config`` from here (or from a dataset base), change a
few fields and say why. The returned config is locked: setting a key that does
not exist (a misspelling, in a file or on the command line) raises at start-up.
"""
import ml_collections

# Where sampling stops (t = eps) under each SDE, as the reference's run_lib picks it: the VE
# noise levels reach sigma_min only near t = 0. Training draws t ~ U(training.eps, 1) for all.
SAMPLING_EPS = {'vesde': 1e-5, 'vpsde': 1e-3, 'subvpsde': 1e-3}


def set_sde(config, name):
  """Selects the SDE ``name`` and the sampling end time ``SAMPLING_EPS[name]``."""
  if name not in SAMPLING_EPS:
    raise ValueError(f'sde.name={name!r}; valid: {sorted(SAMPLING_EPS)}')
  config.sde.name = name
  config.sampling.eps = SAMPLING_EPS[name]
  return config


def get_base_config():
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'gaussian_mixture'   # a toy name, 'digits', 'photos', or an image dataset (datasets.py)
  data.image_size = 0                 # 0: keep the dataset's own size
  data.centered = False               # scale to [-1, 1] instead of [0, 1]
  data.random_flip = False
  data.uniform_dequantization = False
  data.num_bits = 0                   # bits per value of quantized data (8 for images); 0: continuous
  data.num_channels = 3               # image channels (checked against the data)
  data.data_dir = ''                  # '' : datasets.py's default location
  data.tfrecords_path = ''            # ffhq / celebahq: the reference's .tfrecords file(s)
  # The input pipeline (datasets.py, pipeline.py). Batches are a pure function of the step
  # whatever these are: they change speed, never numbers.
  data.memory_budget_mb = 1024.0      # decode once and serve from memory when a host's share fits
  data.num_workers = 0                # worker processes making batches of data read from storage
                                      # (not used for data in memory); 0: the training process
                                      # makes them while the devices run the previous call
  data.prefetch = 2                   # with num_workers > 0: calls' batches each worker makes ahead

  config.sde = sde = ml_collections.ConfigDict()
  sde.name = 'vpsde'                  # vesde | vpsde | subvpsde
  sde.sigma_min = 0.01
  sde.sigma_max = 50.0
  sde.beta_min = 0.1
  sde.beta_max = 20.0
  sde.num_scales = 1000

  config.model = model = ml_collections.ConfigDict()
  model.name = 'mlp'                  # mlp | ncsnpp | ddpm | ncsnv2_64 | ncsnv2_128 | ncsnv2_256 | ncsn
  # How the score comes from the network, with the SDE (models/score.py). ours: noise prediction
  # from inputs scaled to unit variance, label t (mlp, the digits network); reference: the
  # paper's label and output for each SDE, which its networks and checkpoints need
  # (configs/architectures.py sets it).
  model.convention = 'ours'           # ours | reference
  model.ema_rate = 0.999
  model.ema_warmup = True             # decay min(ema_rate, (1 + n) / (10 + n)), as score_sde_pytorch:
                                      # short runs forget the random init (benchmarks/ema_warmup_benchmark.py)
  model.hidden = (128, 128, 128)      # mlp
  model.embed_dim = 64                # mlp: size of the time embedding
  model.nf = 32                       # base width (ncsnpp, ddpm, ncsn, ncsnv2)
  model.ch_mult = (1, 2)              # width multiplier per resolution (ncsnpp, ddpm)
  model.num_res_blocks = 1
  model.attn_resolutions = ()
  model.dropout = 0.0
  # The paper's architectures (configs/architectures.py sets them; models/ documents each).
  model.nonlinearity = 'swish'
  model.resamp_with_conv = True
  model.conditional = True            # time (noise level) conditioning
  model.scale_by_sigma = False        # VE models: output divided by the noise level
  model.fir = False                   # FIR up/down-sampling (ncsnpp)
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = False
  model.resblock_type = 'ddpm'        # ddpm | biggan
  model.progressive = 'none'          # none | output_skip | residual
  model.progressive_input = 'none'    # none | input_skip | residual
  model.progressive_combine = 'sum'   # sum | cat
  model.embedding_type = 'positional' # positional | fourier (of log sigma) | fourier_time (of t: ours)
  model.fourier_scale = 16.0
  model.init_scale = 0.0
  model.interpolation = 'bilinear'    # ncsn, ncsnv2: upsampling in the refine blocks
  model.dtype = 'float32'             # compute dtype of ncsnpp/ddpm: float32 | bfloat16 (mixed
                                      # precision: parameters, optimizer and loss stay float32)

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 256
  training.n_iters = 4000
  training.steps_per_call = 1         # training steps per compiled call (lax.scan)
  training.loss = 'dsm'               # dsm | smld | ddpm | ssm | esm
  training.likelihood_weighting = False
  training.reduce = 'mean'
  training.eps = 1e-5                 # t ~ U(eps, T)
  training.log_freq = 100
  training.snapshot_freq = 1000       # kept snapshots (and snapshot samples)
  training.snapshot_keep = 3
  training.preemption_freq = 200      # the frequent checkpoint that restarts resume from
  training.snapshot_sampling = True

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 100
  optim.grad_clip = 1.0               # global norm; 0 disables

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'              # a name in sampling.SAMPLERS: pc | ode | ddim | heun |
                                      # dpm_solver_2m | dpm_solver_3m | dpm_solver_2s | unipc
  sampling.steps = 20                 # steps of the few-step solvers (pc takes sde.num_scales)
  sampling.grid = ''                  # their time grid (fast_samplers.GRIDS); '' = the solver's own
  sampling.eta = 0.0                  # ddim: 0 deterministic, 1 ancestral
  sampling.churn = 0.0                # heun: EDM's S_churn (0 = Algorithm 1)
  sampling.order = 2                  # unipc: predictor order (the corrector adds one)
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.16
  sampling.n_steps_each = 1
  sampling.probability_flow = False
  sampling.noise_removal = True
  sampling.eps = SAMPLING_EPS[sde.name]   # set_sde keeps it with the SDE; set both on a command line
  sampling.ode_solver = 'dopri5'
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.num_samples = 2000         # sample mode and evaluation
  sampling.batch_size = 2000

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.split = 'test'             # the split of the eval loss and bits/dim
  evaluate.begin_ckpt = 0             # evaluate snapshots with begin <= step <= end (0: all)
  evaluate.end_ckpt = 0
  evaluate.batch_size = 1000
  evaluate.enable_loss = True
  evaluate.enable_bpd = True
  evaluate.bpd_num_repeats = 1        # passes over the test split (5 for dequantized images)
                                      # quantized data (data.num_bits > 0) are always dequantized
  evaluate.bpd_max_examples = 2000    # 0: the whole test split
  evaluate.hutchinson_type = 'rademacher'
  evaluate.rtol = 1e-5
  evaluate.atol = 1e-5
  evaluate.enable_sampling = True     # sampling.num_samples samples, in resumable rounds
  # Sample quality (image data, with enable_sampling): features of the uint8-quantized samples
  # from the digits classifier (dataset 'digits') or the FID Inception network (any other).
  evaluate.enable_fid = False
  evaluate.enable_kid = False
  evaluate.enable_inception_score = False
  evaluate.inception_weights = ''     # converted FID Inception .msgpack; '' : $SCORE_SDE_INCEPTION_WEIGHTS
  evaluate.stats_path = ''            # dataset statistics (--mode stats); '' : <workdir>/stats/<name>.npz
  evaluate.stats_split = 'train'      # the FID protocol compares with the training set
  evaluate.stats_num_examples = 0     # images of stats_split in the statistics; 0: all of them
  evaluate.stats_kid_features = 10_000  # feature rows kept for KID (a seeded subset beyond that)
  evaluate.kid_subsets = 100
  evaluate.kid_subset_size = 1000
  evaluate.is_splits = 1              # IS over all samples at once (tf-gan, the reference); 10 splits read lower
  # Baselines (meant for small data such as digits): sample metrics of held-out real images
  # (eval.split, the floor) and of a Gaussian fit to the training split (the ceiling); with
  # enable_bpd, the bits/dim of a diagonal Gaussian and a Gaussian mixture fit to the
  # training split, on the same dequantized test batches as the model.
  evaluate.enable_baselines = False
  evaluate.gmm_components = 10

  # The noise-conditional classifier of class guidance (--mode train_classifier), trained on
  # the training split perturbed by the run's SDE; models/classifier.py.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.model = 'cnn'            # cnn (small, digits) | wideresnet (CIFAR-10: depth 28, widen 10)
  classifier.nf = 32                  # cnn width
  classifier.depth = 28               # wideresnet
  classifier.widen = 10               # wideresnet
  classifier.dropout = 0.0            # wideresnet
  classifier.n_iters = 3000
  classifier.batch_size = 128
  classifier.lr = 1e-3
  classifier.checkpoint_freq = 500    # resumable checkpoints (atomic)
  classifier.eps = 1e-3               # t ~ U(eps, T)
  classifier.eval_times = (0.001, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)   # accuracy per noise level

  # --mode conditional: class-conditional samples by classifier guidance.
  config.conditional = conditional = ml_collections.ConfigDict()
  conditional.scale = 1.0             # guidance scale: s + scale * grad log p_t(y | x)
  conditional.samples_per_class = 10

  # --mode inverse: posterior samples for y = A x + noise on test images (inverse_lib.py).
  config.inverse = inverse = ml_collections.ConfigDict()
  inverse.task = 'inpainting'         # inpainting | colorization | super_resolution |
                                      # compressed_sensing | mri | ct
  inverse.method = 'projection'       # imputation | projection | dps | moment_matching
  inverse.noise_std = 0.0             # measurement noise, in the model's data scale
  inverse.weight = 1.0                # projection: lambda
  inverse.step_size = 0.1             # dps: zeta
  inverse.cg_iters = 20               # moment_matching
  inverse.covariance = 'isotropic'    # moment_matching: isotropic (PiGDM's, stable) | jacobian
                                      # (Tweedie's through the score's Jacobian: exact for
                                      # Gaussian data, can diverge with a learned score)
  inverse.max_time = 0.5              # moment_matching: no guidance above this t (0: none)
  inverse.num_examples = 8            # the first test images
  inverse.samples_per_example = 4
  inverse.mask = 'half'               # inpainting: half (the right half hidden) | random
  inverse.mask_fraction = 0.3         # inpainting, random: share of pixels observed
  inverse.factor = 2                  # super_resolution
  inverse.measurement_ratio = 0.25    # compressed_sensing: m / d
  inverse.acceleration = 4            # mri: about W / acceleration frequency lines
  inverse.center_lines = 2            # mri: lowest frequencies always sampled
  inverse.num_angles = 4              # ct

  config.lock()
  return config


def get_config():
  return get_base_config()
