"""The demo: every stage of sora-jax on the embedded Shapes data set, in about 45 minutes on 2 CPU cores.

    make demo
runs it end to end (python -m sora_jax.demo --config experiments/shapes_demo.py --workdir runs/demo).
Stages can also be run one by one, e.g.
    python -m sora_jax.train_vae --config experiments/shapes_demo.py --workdir runs/demo/vae
    python -m sora_jax.train --config experiments/shapes_demo.py --workdir runs/demo/dit

Sections (experiments/common.py explains every key): `data` (sora_jax/data), `vae` and `vae_train`
(models/vae.py, train_vae.py), `dit` (models/dit.py, models/text.py), `diffusion` (diffusion.py), `train`
(train.py, optim.py), `mesh` (sharding.py), `sample` (sampling.py), `eval` (evaluate.py) and `demo`
(demo.py). Expected results are in docs/benchmarks.md.
"""
from experiments import common
from sora_jax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False)
  c = common.ConfigDict()
  c.seed = 0

  # Where the demo's stages meet; `python -m sora_jax.demo --workdir W` points them all under W/data.
  c.data = common.shapes_data(
      root="runs/demo", mixture="demo", num_train=1000, num_validation=64, num_test=64,
      vocab_size=128,
      seq_len=1024,
      text_len=384,                  # 256 binds rows of images: 4.4% padding
      max_text_tokens=32,
      max_segments=48,
      batch_size=4,                  # 4 rows x 650 steps beat 2 x 1300 on the same tokens: +9 points of
                                     # colour in each of two seeds, though the denoiser's error is higher
                                     # (docs/history.md, Issue 22); 8 x 325 is too few updates
      token_budget=576,              # the widest segment sets blocksparse's step time: 576 = the largest
                                     # short clip
      min_patch_side=2)
  c.mesh = common.mesh()

  # Short rows in a batch beat long ones with dense-mask attention (docs/history.md, Issue 6).
  c.sample = common.demo_sample()

  # 4.4M params; 650 steps of 4 rows, ~27 min of 2-core CPU (docs/benchmarks.md, "DiT training step and
  # MFU"). Heads of 32: RoPE splits them (t, h, w) = (12, 10, 10). Computed in float32:
  # on XLA:CPU bf16 is slower (4.4 vs 5.2 s/step); pods use bf16.
  c.dit = common.demo_dit(c.data)
  c.diffusion = common.diffusion(
      shift_ref_tokens=64)           # about the demo mixture's mean tokens per sample (68.6): a ~ 1 there

  # Scores and the learning curve: docs/benchmarks.md. No wall-clock cap: the demo trains its steps on any
  # machine and reports a slow stage. lr 2e-3: 5e-3 diverges in quality (docs/history.md, Issue 7).
  c.train = common.demo_trainer()

  # Wan 2.1's layout at toy width; 4x time, 4x space (8x cannot reach 30 dB in the demo's minutes), 8
  # latent channels; without Wan's per-position RMS norm, which learns ~2x slower at this width.
  c.vae = common.demo_vae()
  # ~9-14 min of 2-core CPU (2500 steps: 30.4 dB); docs/benchmarks.md "VAE".
  c.vae_train = common.demo_vae_trainer()

  c.eval = common.evaluation()

  # docs/benchmarks.md, "Demo": about 42 min in all with the step counts above; update them together.
  c.demo = common.demo(expected_minutes=dict(
      data_train=0.2, data_validation=0.1, data_test=0.1, tokenizer=0.1, vae=8.5, latents=1.6, dit=26.5,
      export=0.1, samples=0.5, evaluate=4.5))

  if arg.runlocal:  # every stage in a minute or two: for smoke tests of the whole demo
    c.data.num_train = 64
    c.data.num_validation = c.data.num_test = 8
    common.runlocal(c)
    for stage in c.demo.expected_minutes:  # smoke tests: no expectation to report against
      c.demo.expected_minutes[stage] = 0.0
  return c
