"""Wan 2.1's text side converted from transformers gives transformers' own ids and hidden states.

A tiny random `UMT5EncoderModel` (transformers is the reference implementation; no weights are
downloaded) is saved with `save_pretrained`, converted by sora_jax.convert.umt5 and run on the same
captions: the last hidden state must agree to 1e-4 in float32 at every caption token, for captions
alone (padded to the row, with transformers' attention mask) and packed several to a row. The
tokenizer is a sentencepiece unigram model with T5's ids trained here; transformers' T5Tokenizer is
built from its vocabulary and normalizer, and both must give the ids WanPipeline feeds the encoder.

Needs the `interop` extra (torch, transformers): `make test-interop`.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.interop
_WHY = ("needs the interop extra (torch, transformers, diffusers): pip install -e '.[interop]' or "
        "make test-interop")
torch = pytest.importorskip("torch", reason=_WHY)
transformers = pytest.importorskip("transformers", reason=_WHY)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from sora_jax.convert import umt5 as convert_umt5  # pylint: disable=wrong-import-position
from sora_jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from sora_jax.models import umt5 as umt5_lib  # pylint: disable=wrong-import-position
from test_tokenizer import t5_sentencepiece  # pylint: disable=wrong-import-position

TOL = 1e-4
MAX_LEN = 24
PROMPTS = [
    "",
    "a red fox jumps over the lazy dog",
    "  the camera pans slowly to the left,\n\tthen  a drone flies over snowy mountains &amp; a lake  ",
    # longer than MAX_LEN pieces: truncated to 23 pieces and EOS
    " ".join(["children play football in a sunny park while an old man reads a newspaper"] * 3),
    "Ein Hund läuft über die Straße — 一只猫在跳舞, ＦＵＬＬ width ﬁsh, émoji 🦊 unseen",
]


def _prompts():
  return [tokenizer_lib.clean_wan_prompt(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def spm_proto():
  return t5_sentencepiece()


@pytest.fixture(scope="module")
def hf_tokenizer(spm_proto):
  """transformers' T5Tokenizer over the same vocabulary and normalizer (docs/hazards.md: in transformers 5 it
  does not read an spm file; published folders carry tokenizer.json, which holds both)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(spm_proto)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(spm_proto)
  vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  return transformers.T5Tokenizer(vocab=vocab, extra_ids=0,
                                  _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)


def random_umt5(vocab_size: int, seed: int = 0, **kwargs):
  """A UMT5EncoderModel with signal everywhere: norms off 1 (a misplaced norm cannot hide) and a
  position bias strong enough that a wrong bucket or a wrong relative position shows."""
  torch.manual_seed(seed)
  cfg = transformers.UMT5Config(
      d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=vocab_size,
      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
      relative_attention_max_distance=128, dropout_rate=0.0, **kwargs)
  model = transformers.UMT5EncoderModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.mul_(5.0)
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_proto):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(spm_proto)
  root = tmp_path_factory.mktemp("umt5")
  model = random_umt5(sp.get_piece_size())
  model.save_pretrained(root / "text_encoder")  # model.safetensors + config.json
  encoder, cfg = convert_umt5.load(root / "text_encoder", dtype="float32")
  return {"torch": model, "jax": encoder, "cfg": cfg, "dir": root / "text_encoder", "root": root}


def reference(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


def test_clean_wan_prompt_is_diffusers(monkeypatch):
  wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan", reason=_WHY)
  for p in PROMPTS + ["&amp;lt;b&amp;gt; bold\u3000 ", "\u00a0x\u2003y"]:
    assert tokenizer_lib.clean_wan_prompt(p) == wan.prompt_clean(p), p


def test_ids_equal_t5_tokenizer(spm_proto, hf_tokenizer):
  ours = tokenizer_lib.Tokenizer(spm_proto)
  got = np.stack([ours.encode(p, MAX_LEN, pad=True) for p in _prompts()])
  # WanPipeline's call, at MAX_LEN instead of 512.
  want = hf_tokenizer(_prompts(), padding="max_length", max_length=MAX_LEN, truncation=True,
                      add_special_tokens=True, return_attention_mask=True, return_tensors="np")
  np.testing.assert_array_equal(got, want["input_ids"])
  np.testing.assert_array_equal(got != ours.pad_id, want["attention_mask"].astype(bool))
  lengths = (got != ours.pad_id).sum(1)
  assert lengths[0] == 1 and lengths[3] == MAX_LEN  # "" is EOS alone; the long one is cut
  assert (got[4] == ours.unk_id).any() and lengths[4] > 10  # unseen characters are unk, not dropped


def test_config_follows_transformers(tiny):
  cfg, hf = tiny["cfg"], tiny["torch"].config
  assert cfg["encoder"] == "umt5" and cfg["max_len"] == umt5_lib.WAN_MAX_LEN
  for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon"):
    assert cfg[key] == getattr(hf, key), key
  n_torch = sum(p.numel() for p in tiny["torch"].parameters())
  n_jax = sum(x.size for x in jax.tree.leaves(convert_umt5.convert(tiny["dir"])[1]))
  assert n_jax == n_torch


def test_each_caption_alone_equals_transformers(tiny, spm_proto):
  tok = tokenizer_lib.Tokenizer(spm_proto)
  ids = np.stack([tok.encode(p, MAX_LEN, pad=True) for p in _prompts()])
  mask = (ids != tok.pad_id).astype(np.int32)
  want = reference(tiny["torch"], ids, mask)
  got = np.asarray(tiny["jax"](jnp.asarray(ids), jnp.asarray(mask)))
  assert got.dtype == np.float32 and got.shape == want.shape
  err = np.abs(got - want)[mask.astype(bool)].max()
  assert err <= TOL, err
  assert np.std(want[mask.astype(bool)]) > 0.1  # not vacuous


def test_packed_captions_equal_each_alone(tiny, spm_proto):
  """Three captions in one row (then padding), and in reverse order after padding: each caption's
  states are those transformers gives it alone."""
  tok = tokenizer_lib.Tokenizer(spm_proto)
  captions = [tok.encode(p, MAX_LEN) for p in _prompts()[1:4]]
  row_len = 3 * MAX_LEN + 8
  ids, seg = np.zeros((2, row_len), np.int32), np.zeros((2, row_len), np.int32)
  starts = [[], []]
  for r, (at, order) in enumerate(((0, captions), (5, captions[::-1]))):
    for s, c in enumerate(order, start=1):
      ids[r, at:at + len(c)], seg[r, at:at + len(c)] = c, s
      starts[r].append((at, c))
      at += len(c)
  got = np.asarray(tiny["jax"](jnp.asarray(ids), jnp.asarray(seg)))
  for r in range(2):
    for at, c in starts[r]:
      want = reference(tiny["torch"], c[None], np.ones((1, len(c)), np.int32))[0]
      err = np.abs(got[r, at:at + len(c)] - want).max()
      assert err <= TOL, (r, at, err)


def test_long_row_reaches_the_far_buckets(tiny):
  """160 tokens: relative distances beyond max_distance=128 (the saturated buckets) on both sides."""
  rng = np.random.default_rng(1)
  ids = rng.integers(3, tiny["cfg"]["vocab_size"], (1, 160)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 150:] = 0
  want = reference(tiny["torch"], ids, mask)
  got = np.asarray(tiny["jax"](jnp.asarray(ids), jnp.asarray(mask)))
  err = np.abs(got - want)[0, :150].max()
  assert err <= TOL, err


def test_bucket_function_equals_transformers(tiny):
  attn = tiny["torch"].encoder.block[0].layer[0].SelfAttention
  rel = np.arange(-600, 601)
  want = attn._relative_position_bucket(torch.from_numpy(rel)).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(umt5_lib.relative_position_buckets(rel, 32, 128), want)


def test_sharded_checkpoint_converts_to_the_same_params(tiny):
  sharded = tiny["root"] / "sharded"
  tiny["torch"].save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("model-*.safetensors"))) > 1
  _, want = convert_umt5.convert(tiny["dir"])
  _, got = convert_umt5.convert(sharded)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bf16_checkpoint_converts(tiny, tmp_path):
  """Published Wan text encoders are stored in bfloat16: the reader must take it without torch."""
  model = random_umt5(tiny["cfg"]["vocab_size"], seed=3).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  _, params = convert_umt5.convert(tmp_path / "bf16")
  want = model.encoder.block[1].layer[1].DenseReluDense.wi_0.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers"]["ffn"]["wi_0"]["kernel"][1], want)
