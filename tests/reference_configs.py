"""The reference's paper configs as a table, and how its field names map onto ours.

Written by hand from score_sde_pytorch's ``configs/`` (default_cifar10_configs.py,
default_celeba_configs.py, default_lsun_configs.py, ve/, vp/, subvp/, ve/ncsn/, ve/ncsnv2/;
score_sde's JAX files hold the same values plus ``training.n_jitted_steps``) and from its
run_lib.py for the two values that live in code rather than in a config: the sampling end
time eps (1e-3 for VP and sub-VP, 1e-5 for VE) and the training eps (1e-5).

``REFERENCE[name]`` is the reference's config ``name`` flattened to dotted fields, in the
reference's own names and values, every field its file sets (its dataset defaults
included). tests/test_configs.py checks each of our paper configs against
``expected_ours(name)``; with a reference checkout at hand it also checks this table
against the reference's files (SCORE_SDE_REFERENCE_DIR).

Every reference field is accounted for in exactly one way:

* ``SAME``: same dotted name and meaning in our config.
* ``RENAMED``: same meaning under another name (the sde section is ours; the reference
  keeps the SDE's constants in ``model`` and its name in ``training.sde``).
* converted in ``expected_ours`` (``CONVERTED`` says how): values whose convention differs.
* ``NOT_COMPARED``: fields with no counterpart in ours, each with its reason.
* ``UNREAD_BY_MODEL``: fields a dataset default puts in the file that the reference's code
  for that network never reads.
* ``DELIBERATE``: where we knowingly differ from the reference's file, with the reason.

A field in none of these makes ``expected_ours`` raise, so nothing is skipped silently.
"""

DELETE = object()   # a DELIBERATE value: we have no such field (a misspelt key of the reference)


def _without(fields, *names):
  return {k: v for k, v in fields.items() if k not in names}


# Values the reference sets in run_lib.py, not in its configs.
SAMPLING_EPS = {'vesde': 1e-5, 'vpsde': 1e-3, 'subvpsde': 1e-3}
TRAINING_EPS = 1e-5

# -----------------------------------------------------------------------------
# The reference's dataset defaults (default_*_configs.py).
# -----------------------------------------------------------------------------

_SHARED_DEFAULTS = {
    'training.snapshot_freq': 50000,
    'training.log_freq': 50,
    'training.eval_freq': 100,
    'training.snapshot_sampling': True,
    'training.likelihood_weighting': False,
    'training.continuous': True,
    'training.reduce_mean': False,
    'sampling.n_steps_each': 1,
    'sampling.noise_removal': True,
    'sampling.probability_flow': False,
    'eval.num_samples': 50000,
    'eval.enable_loss': True,
    'eval.enable_bpd': False,
    'eval.bpd_dataset': 'test',
    'data.random_flip': True,
    'data.centered': False,
    'data.uniform_dequantization': False,
    'data.num_channels': 3,
    'model.sigma_min': 0.01,
    'model.beta_min': 0.1,
    'model.beta_max': 20.,
    'model.embedding_type': 'fourier',
    'optim.weight_decay': 0,
    'optim.optimizer': 'Adam',
    'optim.lr': 2e-4,
    'optim.beta1': 0.9,
    'optim.eps': 1e-8,
    'optim.warmup': 5000,
    'optim.grad_clip': 1.,
    'seed': 42,
}

CIFAR10 = {
    **_SHARED_DEFAULTS,
    'training.batch_size': 128,
    'training.n_iters': 1300001,
    'training.snapshot_freq_for_preemption': 10000,
    'sampling.snr': 0.16,
    'eval.begin_ckpt': 9,
    'eval.end_ckpt': 26,
    'eval.batch_size': 1024,
    'eval.enable_sampling': False,
    'data.dataset': 'CIFAR10',
    'data.image_size': 32,
    'model.sigma_max': 50,
    'model.num_scales': 1000,
    'model.dropout': 0.1,
}

CELEBA = {
    **CIFAR10,
    'sampling.snr': 0.17,
    'eval.begin_ckpt': 1,
    'eval.enable_sampling': True,
    'data.dataset': 'CELEBA',
    'data.image_size': 64,
    'model.sigma_max': 90.,
}

LSUN = {
    **_SHARED_DEFAULTS,
    'training.batch_size': 64,
    'training.n_iters': 2400001,
    'training.snapshot_freq_for_preemption': 5000,
    'sampling.snr': 0.075,
    'eval.begin_ckpt': 50,
    'eval.end_ckpt': 96,
    'eval.batch_size': 512,
    'eval.enable_sampling': True,
    'data.dataset': 'LSUN',
    'data.image_size': 256,
    'model.sigma_max': 378,
    'model.num_scales': 2000,
    'model.dropout': 0.,
}

# -----------------------------------------------------------------------------
# Blocks every config file of a kind repeats.
# -----------------------------------------------------------------------------

_VE_PC = {'training.sde': 'vesde', 'sampling.method': 'pc',
          'sampling.predictor': 'reverse_diffusion', 'sampling.corrector': 'langevin'}
_VP_EM = {'training.continuous': True, 'training.reduce_mean': True, 'sampling.method': 'pc',
          'sampling.predictor': 'euler_maruyama', 'sampling.corrector': 'none',
          'data.centered': True}
_VP_DISCRETE = {'training.sde': 'vpsde', 'training.continuous': False,
                'training.reduce_mean': True, 'sampling.method': 'pc',
                'sampling.predictor': 'ancestral_sampling', 'sampling.corrector': 'none',
                'data.centered': True}

_NCSNPP = {
    'model.name': 'ncsnpp',
    'model.normalization': 'GroupNorm',
    'model.nonlinearity': 'swish',
    'model.nf': 128,
    'model.ch_mult': (1, 2, 2, 2),
    'model.num_res_blocks': 4,
    'model.attn_resolutions': (16,),
    'model.resamp_with_conv': True,
    'model.conditional': True,
    'model.fir': True,
    'model.fir_kernel': (1, 3, 3, 1),
    'model.skip_rescale': True,
    'model.resblock_type': 'biggan',
    'model.progressive': 'none',
    'model.progressive_input': 'residual',
    'model.progressive_combine': 'sum',
    'model.attention_type': 'ddpm',
    'model.init_scale': 0.,
    'model.fourier_scale': 16,
    'model.conv_size': 3,
}
_NCSNPP_POSITIONAL = {**_NCSNPP, 'model.embedding_type': 'positional'}
_DDPMPP = {**_NCSNPP, 'model.fir': False, 'model.progressive_input': 'none',
           'model.embedding_type': 'positional'}
_NCSNPP_256 = {**_NCSNPP, 'model.ch_mult': (1, 1, 2, 2, 2, 2, 2), 'model.num_res_blocks': 2,
               'model.progressive': 'output_skip', 'model.progressive_input': 'input_skip'}
_VE_NCSNPP = {**_NCSNPP, 'model.scale_by_sigma': True, 'model.ema_rate': 0.999}
_VP_NCSNPP = {'model.scale_by_sigma': False, 'model.ema_rate': 0.9999}

_DDPM = {
    'model.name': 'ddpm',
    'model.normalization': 'GroupNorm',
    'model.nonlinearity': 'swish',
    'model.nf': 128,
    'model.ch_mult': (1, 2, 2, 2),
    'model.num_res_blocks': 2,
    'model.attn_resolutions': (16,),
    'model.resamp_with_conv': True,
    'model.conditional': True,
}
_VP_DDPM = {**_DDPM, 'model.scale_by_sigma': False, 'model.ema_rate': 0.9999}
_DDPM_256 = {**_VP_DDPM, 'model.num_scales': 1000, 'model.ch_mult': (1, 1, 2, 2, 4, 4),
             'optim.lr': 2e-5}

_REFINENET_OPTIM = {'optim.weight_decay': 0, 'optim.optimizer': 'Adam', 'optim.beta1': 0.9,
                    'optim.amsgrad': False, 'optim.eps': 1e-8, 'optim.warmup': 0,
                    'optim.grad_clip': -1.}
_REFINENET = {'training.continuous': False, 'sampling.method': 'pc', 'sampling.predictor': 'none',
              'sampling.corrector': 'ald', 'model.normalization': 'InstanceNorm++',
              'model.nonlinearity': 'elu', 'model.nf': 128, 'model.interpolation': 'bilinear',
              **_REFINENET_OPTIM}
_NCSN = {**_REFINENET, 'training.sde': 'vesde', 'model.name': 'ncsn', 'model.scale_by_sigma': False,
         'model.ema_rate': 0., 'optim.lr': 1e-3}
_NCSN_V1_SAMPLING = {'sampling.n_steps_each': 100, 'sampling.snr': 0.316, 'model.sigma_max': 1,
                     'model.num_scales': 10}
_NCSNV2 = {**_REFINENET, 'training.sde': 'vesde', 'model.name': 'ncsnv2_64',
           'model.scale_by_sigma': True, 'model.ema_rate': 0.999, 'optim.lr': 1e-4}

# The 1024 px files define every field themselves (no dataset default).
_HQ_1024 = {
    'training.batch_size': 8,
    'training.n_iters': 2400001,
    'training.snapshot_freq': 50000,
    'training.log_freq': 50,
    'training.eval_freq': 100,
    'training.snapshot_freq_for_preemption': 5000,
    'training.snapshot_sampling': True,
    'training.continuous': True,
    'training.likelihood_weighting': False,
    'training.reduce_mean': False,
    **_VE_PC,
    'sampling.probability_flow': False,
    'sampling.snr': 0.15,
    'sampling.n_steps_each': 1,
    'sampling.noise_removal': True,
    'eval.batch_size': 1024,
    'eval.num_samples': 50000,
    'eval.begin_ckpt': 1,
    'eval.end_ckpt': 96,
    'data.image_size': 1024,
    'data.centered': False,
    'data.random_flip': True,
    'data.uniform_dequantization': False,
    'data.num_channels': 3,
    **_NCSNPP_256,
    'model.scale_by_sigma': True,
    'model.sigma_max': 1348,
    'model.num_scales': 2000,
    'model.ema_rate': 0.9999,
    'model.sigma_min': 0.01,
    'model.nf': 16,
    'model.ch_mult': (1, 2, 4, 8, 16, 32, 32, 32),
    'model.num_res_blocks': 1,
    'model.dropout': 0.,
    'model.embedding_type': 'fourier',
    **_REFINENET_OPTIM,
    'optim.lr': 2e-4,
    'optim.warmup': 5000,
    'optim.grad_clip': 1.,
    'seed': 42,
}

# -----------------------------------------------------------------------------
# The table: one entry per reference config file.
# -----------------------------------------------------------------------------

REFERENCE = {
    # VE, NCSN++ and the DDPM network trained as an SMLD model.
    've/cifar10_ncsnpp_continuous': {**CIFAR10, **_VE_PC, 'training.continuous': True,
                                     **_VE_NCSNPP},
    've/cifar10_ncsnpp_deep_continuous': {**CIFAR10, **_VE_PC, 'training.continuous': True,
                                          'training.n_iters': 950001, **_VE_NCSNPP,
                                          'model.num_res_blocks': 8},
    've/cifar10_ncsnpp': {**CIFAR10, **_VE_PC, 'training.continuous': False,
                          **_without(_VE_NCSNPP, 'model.fourier_scale'),
                          'model.embedding_type': 'positional'},
    've/celeba_ncsnpp': {**CELEBA, **_VE_PC, 'training.continuous': False,
                         **_without(_VE_NCSNPP, 'model.fourier_scale'),
                         'model.embedding_type': 'positional', 'model.sigma_begin': 90},
    've/cifar10_ddpm': {**CIFAR10, **_VE_PC, 'training.continuous': False, **_DDPM,
                        'model.scale_by_sigma': True, 'model.ema_rate': 0.999, 'model.conv_size': 3},
    've/bedroom_ncsnpp_continuous': {**LSUN, **_VE_PC, 'training.continuous': True,
                                     'data.category': 'bedroom', **_VE_NCSNPP, **_NCSNPP_256},
    've/church_ncsnpp_continuous': {**LSUN, **_VE_PC, 'training.continuous': True,
                                    'data.category': 'church_outdoor', **_VE_NCSNPP, **_NCSNPP_256,
                                    'model.sigma_max': 380},
    've/ffhq_256_ncsnpp_continuous': {
        **LSUN, **_VE_PC, 'training.continuous': True, 'data.dataset': 'FFHQ',
        'data.image_size': 256, 'data.tfrecords_path': '/home/yangsong/ncsc/ffhq/ffhq-r08.tfrecords',
        **_VE_NCSNPP, **_NCSNPP_256, 'model.sigma_max': 348},
    've/celebahq_256_ncsnpp_continuous': {
        **LSUN, **_VE_PC, 'training.continuous': True, 'data.dataset': 'CelebAHQ',
        'data.image_size': 256, 'data.tfrecords_path': '/home/yangsong/ncsc/celebahq/r08.tfrecords',
        **_VE_NCSNPP, **_NCSNPP_256, 'model.sigma_max': 348},
    've/ffhq_ncsnpp_continuous': {
        **_HQ_1024, 'training.reduce_mean': True, 'data.dataset': 'FFHQ',
        'data.tfrecords_path': '/raid/song/ffhq-dataset/ffhq/ffhq-r10.tfrecords'},
    've/celebahq_ncsnpp_continuous': {
        **_HQ_1024, 'data.dataset': 'CelebAHQ',
        'data.tfrecords_path': '/atlas/u/yangsong/celeba_hq/-r10.tfrecords'},
    # VP and sub-VP, continuous: Euler-Maruyama sampling.
    **{f'{sde}/cifar10_{net}_continuous': {
        **CIFAR10, **_VP_EM, 'training.sde': f'{sde}sde', **block, **_VP_NCSNPP}
       for sde in ('vp', 'subvp')
       for net, block in (('ddpmpp', _DDPMPP), ('ncsnpp', _NCSNPP_POSITIONAL))},
    **{f'{sde}/cifar10_{net}_deep_continuous': {
        **CIFAR10, **_VP_EM, 'training.sde': f'{sde}sde', 'training.n_iters': 950001, **block,
        **_VP_NCSNPP, 'model.num_res_blocks': 8}
       for sde in ('vp', 'subvp')
       for net, block in (('ddpmpp', _DDPMPP), ('ncsnpp', _NCSNPP_POSITIONAL))},
    'subvp/cifar10_ddpm_continuous': {**CIFAR10, **_VP_EM, 'training.sde': 'subvpsde', **_VP_DDPM},
    'vp/ddpm/cifar10_continuous': {**CIFAR10, **_VP_EM, 'training.sde': 'vpsde', **_VP_DDPM},
    # VP, discrete (the DDPM objective).
    'vp/cifar10_ddpmpp': {**CIFAR10, **_VP_DISCRETE, **_DDPMPP, **_VP_NCSNPP},
    'vp/cifar10_ncsnpp': {**CIFAR10, **_VP_DISCRETE, 'sampling.predictor': 'reverse_diffusion',
                          **_without(_NCSNPP, 'model.fourier_scale'),
                          'model.embedding_type': 'positional', **_VP_NCSNPP},
    'vp/ddpm/cifar10': {**CIFAR10, **_VP_DISCRETE, **_VP_DDPM},
    'vp/ddpm/cifar10_unconditional': {**CIFAR10, **_VP_DISCRETE, **_VP_DDPM,
                                      'model.conditional': False},
    'vp/ddpm/bedroom': {**LSUN, **_VP_DISCRETE, 'data.category': 'bedroom', **_DDPM_256},
    'vp/ddpm/church': {**LSUN, **_VP_DISCRETE, 'data.category': 'church_outdoor', **_DDPM_256},
    'vp/ddpm/celebahq': {**LSUN, **_VP_DISCRETE, 'data.dataset': 'CelebAHQ',
                         'data.tfrecords_path': '/atlas/u/yangsong/celeba_hq/-r10.tfrecords',
                         'data.image_size': 256, **_DDPM_256},
    # NCSN v1 and the ablations of "Improved Techniques" (NCSNv2's techniques 1, 2, 4, 5 on v1).
    've/ncsn/cifar10': {**CIFAR10, **_NCSN, **_NCSN_V1_SAMPLING},
    've/ncsn/cifar10_5': {**CIFAR10, **_NCSN, **_NCSN_V1_SAMPLING, 'model.ema_rate': 0.999},
    've/ncsn/cifar10_124': {**CIFAR10, **_NCSN, 'sampling.n_steps_each': 5, 'sampling.snr': 0.176,
                            'model.num_scales': 232},
    've/ncsn/cifar10_1245': {**CIFAR10, **_NCSN, 'sampling.n_steps_each': 5, 'sampling.snr': 0.176,
                             'model.num_scales': 232, 'model.ema_rate': 0.999},
    've/ncsn/celeba': {**_without({**CELEBA, **_NCSN, **_NCSN_V1_SAMPLING}, 'training.sde'),
                       'training.loss': 'vesde'},
    've/ncsn/celeba_5': {**CELEBA, **_NCSN, **_NCSN_V1_SAMPLING, 'model.ema_rate': 0.999},
    've/ncsn/celeba_124': {**CELEBA, **_NCSN, 'sampling.n_steps_each': 5, 'sampling.snr': 0.128,
                           'model.num_scales': 500},
    've/ncsn/celeba_1245': {**CELEBA, **_NCSN, 'sampling.n_steps_each': 5, 'sampling.snr': 0.128,
                            'model.num_scales': 500, 'model.ema_rate': 0.999},
    # NCSNv2.
    've/ncsnv2/cifar10': {**CIFAR10, **_NCSNV2, 'sampling.n_steps_each': 5, 'sampling.snr': 0.176,
                          'model.num_scales': 232},
    've/ncsnv2/celeba': {**CELEBA, **_NCSNV2, 'sampling.n_steps_each': 5, 'sampling.snr': 0.128,
                         'model.num_scales': 500},
    've/ncsnv2/bedroom': {**LSUN, **_NCSNV2,
                          'training.continuous': True,   # the default: the file misspells it
                          'training.continuouse': False,
                          'training.batch_size': 128, 'sampling.n_steps_each': 3,
                          'sampling.snr': 0.095, 'data.category': 'bedroom', 'data.image_size': 128,
                          'model.name': 'ncsnv2_128', 'model.sigma_max': 190,
                          'model.num_scales': 1086, 'model.ema_rate': 0.9999},
}

# -----------------------------------------------------------------------------
# How the reference's fields map onto ours.
# -----------------------------------------------------------------------------

SAME = (
    'seed',
    'training.batch_size', 'training.snapshot_freq', 'training.log_freq',
    'training.snapshot_sampling', 'training.likelihood_weighting',
    'sampling.method', 'sampling.predictor', 'sampling.corrector', 'sampling.snr',
    'sampling.n_steps_each', 'sampling.probability_flow', 'sampling.noise_removal',
    'eval.batch_size', 'eval.enable_loss', 'eval.enable_bpd',
    'data.image_size', 'data.centered', 'data.random_flip', 'data.uniform_dequantization',
    'data.num_channels',
    'model.name', 'model.ema_rate', 'model.dropout', 'model.embedding_type', 'model.nf',
    'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions', 'model.resamp_with_conv',
    'model.conditional', 'model.scale_by_sigma', 'model.nonlinearity', 'model.fir',
    'model.fir_kernel', 'model.skip_rescale', 'model.resblock_type', 'model.progressive',
    'model.progressive_input', 'model.progressive_combine', 'model.init_scale',
    'model.fourier_scale', 'model.interpolation',
    'optim.weight_decay', 'optim.lr', 'optim.beta1', 'optim.eps', 'optim.warmup',
)

RENAMED = {
    'training.sde': 'sde.name',
    'model.sigma_min': 'sde.sigma_min',
    'model.sigma_max': 'sde.sigma_max',
    'model.num_scales': 'sde.num_scales',
    'model.beta_min': 'sde.beta_min',
    'model.beta_max': 'sde.beta_max',
    'training.snapshot_freq_for_preemption': 'training.preemption_freq',
    'eval.num_samples': 'sampling.num_samples',   # ours: one count for sample and eval modes
}

_DATASETS = {'CIFAR10': 'cifar10', 'CELEBA': 'celeb_a', 'CelebAHQ': 'celebahq', 'FFHQ': 'ffhq'}
_TFRECORDS_DATASETS = ('FFHQ', 'CelebAHQ')

CONVERTED = {
    'training.n_iters': 'training.n_iters = reference - 1: the reference loops over steps '
                        '0..n_iters inclusive and sets 1.3M + 1 so that its last snapshot lands '
                        'on 1.3M; ours counts completed steps and snapshots at n_iters',
    'training.continuous': "training.loss: 'dsm' when continuous, else 'smld' (VE) or 'ddpm' (VP)",
    'training.reduce_mean': "training.reduce: 'mean' when True, else 'sum'",
    'optim.grad_clip': 'optim.grad_clip: the reference disables clipping with a negative value, '
                       'ours with 0',
    'data.dataset': "data.dataset: our TFDS-style names; LSUN is 'lsun/<data.category>'",
    'data.category': 'folded into data.dataset',
    'eval.bpd_dataset': "eval.split; for FFHQ and CelebA-HQ the reference reads its one "
                        "TFRecords file for 'test' too, which ours calls 'train'",
}

NOT_COMPARED = {
    'training.eval_freq': 'ours computes no eval loss while training; --mode eval does',
    'eval.begin_ckpt': "checkpoint indices of the authors' runs; ours selects by step",
    'eval.end_ckpt': "checkpoint indices of the authors' runs; ours selects by step",
    'eval.enable_sampling': "which evaluations a run does is our eval section's choice "
                            '(image configs sample for FID/KID/IS)',
    'data.tfrecords_path': "a path on the authors' machines (ours: '' and --config.data.tfrecords_path)",
    'model.normalization': 'implied by model.name (compared; NORMALIZATION, checked against the '
                           'table): GroupNorm in ncsnpp/ddpm, InstanceNorm++ in ncsnv2, its '
                           "conditional form in ncsn (the reference's 'ncsn' names the "
                           'unconditional one, which cannot take labels: tests/test_ncsnv2.py)',
    'model.attention_type': "our networks have one attention block, the reference's 'ddpm'",
    'model.conv_size': 'our networks use 3x3 convolutions throughout, the only value the '
                       "reference's configs set",
    'model.sigma_begin': 'a stray key of ve/celeba_ncsnpp that no reference code reads',
    'optim.optimizer': "always Adam in ours (optax.adamw with optim.weight_decay, 0 in every "
                       "paper config); the reference's only option is 'Adam'",
    'optim.amsgrad': 'read by no reference code (False wherever set)',
}

NORMALIZATION = {'ncsnpp': 'GroupNorm', 'ddpm': 'GroupNorm', 'ncsn': 'InstanceNorm++',
                 'ncsnv2_64': 'InstanceNorm++', 'ncsnv2_128': 'InstanceNorm++'}

_DEFAULT_EMBEDDING = ('a dataset default of the reference that its {} network never reads '
                      '(it has no choice of embedding)')
UNREAD_BY_MODEL = {
    'ddpm': {'model.embedding_type': _DEFAULT_EMBEDDING.format('DDPM')},
    'ncsn': {'model.embedding_type': _DEFAULT_EMBEDDING.format('NCSN')},
    'ncsnv2_64': {'model.embedding_type': _DEFAULT_EMBEDDING.format('NCSNv2')},
    'ncsnv2_128': {'model.embedding_type': _DEFAULT_EMBEDDING.format('NCSNv2')},
}

_TYPO_CONTINUOUS = ('the file sets training.continuouse (a typo), so the default continuous=True '
                    'stays, with which its NCSNv2 cannot run (labels index sigmas): ours is discrete')
_TYPO_SDE = ("the file sets training.loss = 'vesde' where it means training.sde, which then "
             'is missing and the reference stops; ours is VE')
_HQ_EVAL_BATCH = ('1024 images of 1024 px are 12 GiB of float32 input per eval batch; ours '
                  'evaluates in batches of 8, the training batch')
# (config, reference field) -> (the value we use, in the reference's terms; reason).
DELIBERATE = {
    ('ve/ncsnv2/bedroom', 'training.continuous'): (False, _TYPO_CONTINUOUS),
    ('ve/ncsnv2/bedroom', 'training.continuouse'): (DELETE, _TYPO_CONTINUOUS),
    ('ve/ncsn/celeba', 'training.sde'): ('vesde', _TYPO_SDE),
    ('ve/ncsn/celeba', 'training.loss'): (DELETE, _TYPO_SDE),
    ('ve/ffhq_ncsnpp_continuous', 'eval.batch_size'): (8, _HQ_EVAL_BATCH),
    ('ve/celebahq_ncsnpp_continuous', 'eval.batch_size'): (8, _HQ_EVAL_BATCH),
}


def reference_as_we_run_it(name):
  """``REFERENCE[name]`` with our ``DELIBERATE`` differences applied (reference names)."""
  fields = dict(REFERENCE[name])
  for (config, field), (value, _) in DELIBERATE.items():
    if config != name:
      continue
    if value is DELETE:
      del fields[field]
    else:
      fields[field] = value
  return fields


def expected_ours(name):
  """The values our config ``name`` must hold: {our dotted field: value}.

  Raises:
    KeyError: naming a reference field that this module does not account for.
  """
  ref = reference_as_we_run_it(name)
  unread = UNREAD_BY_MODEL.get(ref['model.name'], {})
  out = {}
  for field, value in ref.items():
    if field in unread or field in NOT_COMPARED or field in CONVERTED:
      continue
    if field in SAME:
      out[field] = value
    elif field in RENAMED:
      out[RENAMED[field]] = value
    else:
      raise KeyError(f'{name}: reference field {field!r} is neither compared nor explained')
  sde = ref['training.sde']
  out['training.n_iters'] = ref['training.n_iters'] - 1
  out['training.loss'] = ('dsm' if ref['training.continuous'] else
                          {'vesde': 'smld', 'vpsde': 'ddpm'}[sde])
  out['training.reduce'] = 'mean' if ref['training.reduce_mean'] else 'sum'
  out['optim.grad_clip'] = max(float(ref['optim.grad_clip']), 0.0)
  dataset = ref['data.dataset']
  out['data.dataset'] = (f"lsun/{ref['data.category']}" if dataset == 'LSUN' else
                         _DATASETS[dataset])
  if 'eval.bpd_dataset' in ref:
    split = ref['eval.bpd_dataset']
    out['eval.split'] = 'train' if dataset in _TFRECORDS_DATASETS else split
  # Set in the reference's run_lib.py, not in its configs.
  out['training.eps'] = TRAINING_EPS
  out['sampling.eps'] = SAMPLING_EPS[sde]
  return out
