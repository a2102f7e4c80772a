import numpy as np

from sora_jax import evaluate
from sora_jax.bench import motion_tracks
from sora_jax.data import shapes


def test_steps_split_at_latent_frame_boundaries():
  smooth = np.arange(17, dtype=np.float64)              # 1 px per frame everywhere
  assert motion_tracks.step_sizes(smooth, 4) == (1.0, 1.0)
  # Still inside each latent frame, a jump of 4 into the next: the redrawn-object signature.
  jumpy = np.array([0.0] + [4.0 * (1 + k // 4) for k in range(16)])
  inside, across = motion_tracks.step_sizes(jumpy, 4)
  assert inside == 0.0 and across == 4.0
  gaps = smooth.copy()
  gaps[3] = np.nan
  assert motion_tracks.step_sizes(gaps, 4) == (1.0, 1.0)


def test_specs_are_one_object_straight_and_uncut():
  for s in evaluate.straight_specs("demo", 6, 4):
    assert len(s.objects) == 1 and s.objects[0].motion.startswith("moving")
    assert not s.cut_frame and s.num_frames > 4


def test_motion_hits_counts_the_truth_and_not_a_frozen_clip():
  specs = evaluate.straight_specs("single", 4, 4)
  truths = [shapes.render_clip(s) for s in specs]
  assert motion_tracks.motion_hits(truths, specs) == 4
  frozen = [np.repeat(v[:1], len(v), axis=0) for v in truths]  # the first frame held: "still"
  assert motion_tracks.motion_hits(frozen, specs) == 0
