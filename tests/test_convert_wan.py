"""sora_jax.convert.wan without torch: the diffusers configs it accepts, what it makes of them, and the
one-line refusals (the tensor-level checks against diffusers are in tests/test_wan_*_interop.py)."""
import pytest

from sora_jax.convert import wan

WAN_1_3B = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=12,
                attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


def test_dit_config_of_the_published_1_3b():
  dit, patch = wan.dit_config(WAN_1_3B)
  assert patch == (1, 2, 2)
  assert (dit["width"], dit["depth"], dit["num_heads"], dit["ffn_dim"]) == (1536, 30, 12, 8960)
  assert (dit["in_dim"], dit["text_encoder"], dit["text_dim"], dit["dtype"]) == (64, "umt5", 4096, "bfloat16")


@pytest.mark.parametrize("key,value,match", [
    ("image_dim", 1280, "image_dim"), ("added_kv_proj_dim", 5120, "added_kv_proj_dim"),
    ("qk_norm", "rms_norm", "qk_norm"), ("cross_attn_norm", False, "cross_attn_norm"),
    ("out_channels", 48, "out_channels")])
def test_dit_config_refuses_what_the_dit_is_not(key, value, match):
  with pytest.raises(wan.ConversionError, match=match):
    wan.dit_config(dict(WAN_1_3B, **{key: value}))


def test_scheduler_settings():
  unipc = dict(_class_name="UniPCMultistepScheduler", prediction_type="flow_prediction", use_flow_sigmas=True,
               flow_shift=3.0, solver_order=2, solver_type="bh2", lower_order_final=True, predict_x0=True)
  sample, diffusion = wan.scheduler_settings(unipc)
  assert (sample["sampler"], sample["time_grid"], sample["unipc"]["order"]) == ("unipc", "unipc", 2)
  assert (diffusion["shift_rule"], diffusion["shift_scale"]) == ("constant", 3.0)
  sample, diffusion = wan.scheduler_settings(dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=5.0))
  assert (sample["sampler"], sample["time_grid"], diffusion["shift_scale"]) == ("euler", "flow_match", 5.0)
  with pytest.raises(wan.ConversionError, match="epsilon"):
    wan.scheduler_settings(dict(unipc, prediction_type="epsilon"))
  with pytest.raises(wan.ConversionError, match="DDIMScheduler"):
    wan.scheduler_settings(dict(_class_name="DDIMScheduler"))
