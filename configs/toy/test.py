"""A tiny run for smoke tests: few steps, few samples, frequent checkpoints."""
from configs.toy import mixture


def get_config():
  config = mixture.get_config()
  config.training.n_iters = 40
  config.training.batch_size = 64
  config.training.log_freq = 10
  config.training.snapshot_freq = 20
  config.training.preemption_freq = 10
  config.training.steps_per_call = 1  # one compiled step: quick to compile, any frequency
  config.sde.num_scales = 50          # short samplers
  config.model.hidden = (32, 32)
  config.optim.warmup = 0             # 40 steps inside a 100-step warm-up leave the network near
                                      # its initialization, and samples diverge (energy distance ~800)
  config.sampling.num_samples = 200
  config.sampling.batch_size = 100
  config.eval.batch_size = 100
  config.eval.bpd_max_examples = 100
  config.eval.rtol = 1e-3
  config.eval.atol = 1e-3
  return config
