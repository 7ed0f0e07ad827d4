"""GGUF and Hugging Face loaders: dequantization, weight layout (q/k un-permutation), errors.

The dequantization references below decode the raw block bytes by hand (ggml's block layouts), so
they do not share code with the gguf package's dequantizer that `models.loaders` uses.
"""

from __future__ import annotations

import json
import os
import types

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from models import loaders
from models.config import PRESETS, RopeScaling
from tests import projections

# ------------------------------------------------------------------------------------------------
# Reference decoders of ggml blocks (little endian), one block at a time
# ------------------------------------------------------------------------------------------------


def _f16(b: bytes) -> np.float32:
  return np.float32(np.frombuffer(b, dtype="<f2")[0])


def ref_dequantize(raw: bytes, qtype: QT) -> np.ndarray:
  """Decodes a flat byte string of ggml data to float32 values (flat)."""
  if qtype == QT.F32:
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)
  if qtype == QT.F16:
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)
  if qtype == QT.BF16:
    # bf16 is the top half of a float32.
    return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4").astype(np.float32)
  out = []
  if qtype == QT.Q8_0:  # {f16 d; int8 q[32]} -> d * q
    for o in range(0, len(raw), 34):
      d = _f16(raw[o:o + 2])
      q = np.frombuffer(raw[o + 2:o + 34], dtype=np.int8).astype(np.float32)
      out.append(d * q)
  elif qtype in (QT.Q4_0, QT.Q4_1):
    # Q4_0 {f16 d; u8 qs[16]} -> d * (nibble - 8); Q4_1 {f16 d; f16 m; u8 qs[16]} -> d * nibble + m.
    # Element j < 16 is the low nibble of qs[j], element j + 16 its high nibble.
    size = 18 if qtype == QT.Q4_0 else 20
    for o in range(0, len(raw), size):
      d = _f16(raw[o:o + 2])
      qs = np.frombuffer(raw[o + size - 16:o + size], dtype=np.uint8)
      nib = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
      if qtype == QT.Q4_0:
        out.append(d * (nib - 8))
      else:
        out.append(d * nib + _f16(raw[o + 2:o + 4]))
  else:
    raise NotImplementedError(qtype)
  return np.concatenate(out).astype(np.float32)


def _rand_f16(rng, n) -> np.ndarray:
  """Random non-zero float16 scales with random signs."""
  return (rng.uniform(0.01, 1.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16)


def make_bytes(rng, qtype: QT, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """(array to hand GGUFWriter.add_tensor, raw little-endian bytes as uint8) of random data."""
  if qtype == QT.F32:
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    return a, a.view(np.uint8)
  if qtype == QT.F16:
    a = rng.standard_normal((rows, cols)).astype(np.float16)
    return a, a.view(np.uint8)
  if qtype == QT.BF16:
    f = rng.standard_normal((rows, cols)).astype(np.float32)
    a = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, cols * 2)
    return a, a
  n_blocks = rows * cols // 32
  if qtype == QT.Q8_0:
    d = _rand_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    q = rng.integers(-128, 128, (n_blocks, 32)).astype(np.int8).view(np.uint8)
    blocks = np.concatenate([d, q], axis=1)
  elif qtype == QT.Q4_0:
    d = _rand_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    blocks = np.concatenate([d, rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)], axis=1)
  elif qtype == QT.Q4_1:
    d = _rand_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    m = _rand_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    blocks = np.concatenate([d, m, rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)], axis=1)
  else:
    raise NotImplementedError(qtype)
  a = blocks.reshape(rows, -1)
  return a, a


def _add(writer, name, arr, qtype):
  if qtype in (QT.F32, QT.F16):
    writer.add_tensor(name, arr)
  else:
    writer.add_tensor(name, arr, raw_dtype=qtype)


def _finish(writer):
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1]


# ------------------------------------------------------------------------------------------------
# (a) dequantization
# ------------------------------------------------------------------------------------------------

def test_dequantize_matches_reference(tmp_path):
  rng = np.random.default_rng(0)
  rows, cols = 5, 96
  path = str(tmp_path / "types.gguf")
  w = gguf.GGUFWriter(path, "llama")
  raws = {}
  for qt in ALL_TYPES:
    arr, raw = make_bytes(rng, qt, rows, cols)
    raws[qt.name] = raw.tobytes()
    _add(w, f"t.{qt.name}", arr, qt)
  # Bytes made by the gguf quantizer from data, too (real-world block contents).
  data = rng.standard_normal((rows, cols)).astype(np.float32)
  for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
    q = gguf.quants.quantize(data, qt)
    raws["quantized." + qt.name] = q.tobytes()
    _add(w, f"t.quantized.{qt.name}", q, qt)
  _finish(w)

  reader = gguf.GGUFReader(path)
  by_name = {t.name: t for t in reader.tensors}
  assert len(by_name) == len(raws)
  for key, raw in raws.items():
    t = by_name[f"t.{key}"]
    qt = QT[key.split(".")[-1]]
    assert np.asarray(t.data).tobytes() == raw  # the file holds exactly our bytes
    got = loaders.dequantize_gguf_tensor(t)
    assert got.dtype == np.float32 and got.shape == (rows, cols), key
    want = ref_dequantize(raw, qt).reshape(rows, cols)
    assert np.all(want != 0) or qt not in (QT.F32, QT.F16, QT.BF16), key
    np.testing.assert_array_equal(got, want, err_msg=key)
    if key.startswith("quantized."):
      # Sanity of the reference itself: the quantized values approximate the data.
      tol = {"Q8_0": 0.02, "Q4_0": 0.45, "Q4_1": 0.3}[qt.name]
      assert np.max(np.abs(got - data)) < tol, key


def test_dequantize_unsupported_type_names_tensor():
  fake = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=QT.Q8_1,
                               shape=np.array([32, 1]), data=np.zeros((1, 36), np.uint8))
  with pytest.raises(ValueError) as e:
    loaders.dequantize_gguf_tensor(fake)
  assert "Q8_1" in str(e.value) and "blk.0.attn_q.weight" in str(e.value)


# ------------------------------------------------------------------------------------------------
# (b) a tiny llama GGUF written as llama.cpp's converter does
# ------------------------------------------------------------------------------------------------

D, N, K, H, F, L = 64, 4, 2, 16, 96, 2


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map (byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def tiny_vocab() -> list[str]:
  return SPECIALS + list(_bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "Ġa"]


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, on an HF [out, in] weight."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def write_tiny_llama(path, rng, *, tied=True, rope_freqs=None):
  """Writes a 2-layer llama GGUF; returns the HF-layout float32 weights the loader must recover."""
  vocab = tiny_vocab()
  v = len(vocab)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_name("tiny-test")
  w.add_block_count(L)
  w.add_context_length(512)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(N)
  w.add_head_count_kv(K)
  w.add_rope_freq_base(500000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_dimension_count(H)
  w.add_vocab_size(v)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(vocab)
  w.add_token_types([3] * len(SPECIALS) + [1] * (v - len(SPECIALS)))
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TINY_TEMPLATE)

  expect = {}

  def quantized(name, hf_w, qt):
    """Stores hf_w ([out, in]) as qt; returns what dequantization must give (per the reference)."""
    if qt == QT.F32:
      w.add_tensor(name, hf_w.astype(np.float32))
      return hf_w.astype(np.float32)
    if qt == QT.F16:
      w.add_tensor(name, hf_w.astype(np.float16))
      return hf_w.astype(np.float16).astype(np.float32)
    q = gguf.quants.quantize(hf_w.astype(np.float32), qt)
    w.add_tensor(name, q, raw_dtype=qt)
    return ref_dequantize(q.tobytes(), qt).reshape(hf_w.shape)

  def rnd(*shape, scale=0.1):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  expect["embed"] = quantized("token_embd.weight", rnd(v, D), QT.Q8_0)
  for i in range(L):
    p = f"blk.{i}."
    q_hf, k_hf = rnd(N * H, D), rnd(K * H, D)
    expect[f"{i}.q"] = q_hf
    expect[f"{i}.k"] = k_hf
    # Stored as llama.cpp's converter stores them: permuted for its interleaved RoPE.
    w.add_tensor(p + "attn_q.weight", hf_permute(q_hf, N))
    w.add_tensor(p + "attn_k.weight", hf_permute(k_hf, K))
    expect[f"{i}.v"] = quantized(p + "attn_v.weight", rnd(K * H, D), QT.F16)
    expect[f"{i}.o"] = quantized(p + "attn_output.weight", rnd(D, N * H), QT.Q8_0)
    expect[f"{i}.gate"] = quantized(p + "ffn_gate.weight", rnd(F, D), QT.Q4_1)
    expect[f"{i}.up"] = quantized(p + "ffn_up.weight", rnd(F, D), QT.Q4_0)
    expect[f"{i}.down"] = quantized(p + "ffn_down.weight", rnd(D, F), QT.Q8_0)
    expect[f"{i}.norm1"] = quantized(p + "attn_norm.weight", 1 + rnd(D), QT.F32)
    expect[f"{i}.norm2"] = quantized(p + "ffn_norm.weight", 1 + rnd(D), QT.F32)
  expect["final_norm"] = quantized("output_norm.weight", 1 + rnd(D), QT.F32)
  if not tied:
    expect["lm_head"] = quantized("output.weight", rnd(v, D), QT.F16)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  _finish(w)
  return expect


def llama3_rope_factors(theta, head_dim, factor, low, high, orig):
  """convert_hf_to_gguf.py's Llama 3 rope_freqs (per-frequency divisors)."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for f in freqs:
    wavelen = 2 * np.pi / f
    if wavelen < orig / high:
      out.append(1.0)
    elif wavelen > orig / low:
      out.append(factor)
    else:
      smooth = (orig / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def _check_params(params, expect, tied):
  lay = params["layers"]
  assert set(params) == {"embed", "layers", "final_norm"} | (set() if tied else {"lm_head"})
  np.testing.assert_array_equal(np.asarray(params["embed"]), expect["embed"])
  np.testing.assert_array_equal(np.asarray(params["final_norm"]), expect["final_norm"])
  if not tied:
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), expect["lm_head"].T)
  ai, am = projections.attn_in(lay["attn_in"]), projections.attn_out_mlp(lay["attn_out_mlp"])
  assert ai["wq"].shape == (L, D, N, H) and ai["wk"].shape == (L, D, K, H)
  assert ai["wv"].shape == (L, D, K, H) and am["wo"].shape == (L, N, H, D)
  assert am["w_gate"].shape == (L, D, F) and am["w_down"].shape == (L, F, D)
  for i in range(L):
    # y = x @ W: W is HF's [out, in] transposed, then split into heads.
    np.testing.assert_array_equal(np.asarray(ai["wq"][i]), expect[f"{i}.q"].T.reshape(D, N, H))
    np.testing.assert_array_equal(np.asarray(ai["wk"][i]), expect[f"{i}.k"].T.reshape(D, K, H))
    np.testing.assert_array_equal(np.asarray(ai["wv"][i]), expect[f"{i}.v"].T.reshape(D, K, H))
    np.testing.assert_array_equal(np.asarray(am["wo"][i]), expect[f"{i}.o"].T.reshape(N, H, D))
    np.testing.assert_array_equal(np.asarray(ai["norm"][i]), expect[f"{i}.norm1"])
    np.testing.assert_array_equal(np.asarray(am["norm"][i]), expect[f"{i}.norm2"])
    np.testing.assert_array_equal(np.asarray(am["w_gate"][i]), expect[f"{i}.gate"].T)
    np.testing.assert_array_equal(np.asarray(am["w_up"][i]), expect[f"{i}.up"].T)
    np.testing.assert_array_equal(np.asarray(am["w_down"][i]), expect[f"{i}.down"].T)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_gguf_roundtrip(tmp_path, tied):
  rng = np.random.default_rng(1)
  path = tmp_path / "tiny.gguf"
  rope_freqs = None if tied else llama3_rope_factors(500000.0, H, 8.0, 1.0, 4.0, 8192)
  expect = write_tiny_llama(path, rng, tied=tied, rope_freqs=rope_freqs)
  cfg, params, tok = loaders.load_gguf(path)
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (
      L, D, N, K, H, F)
  assert cfg.vocab_size == len(tiny_vocab()) and cfg.tie_embeddings == tied
  assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5 and cfg.max_seq_len == 512
  assert not cfg.qkv_bias and cfg.name == "tiny-test" and cfg.dtype == "float32"
  assert cfg.rope_scaling == (None if tied else RopeScaling(8.0, 1.0, 4.0, 8192))
  _check_params(params, expect, tied)
  # The permutation is not a no-op at these shapes: loading without undoing it would differ.
  assert not np.array_equal(hf_permute(expect["0.q"], N), expect["0.q"])

  # The tokenizer from the file's metadata.
  ids = {t: tok.token_to_id(t) for t in ("t", "he", "Ġthe", "Ġa")}
  assert tok.encode("the the a") == [ids["t"], ids["he"], ids["Ġthe"], ids["Ġa"]]
  assert tok.encode("<|im_start|>hi") == [1, tok.token_to_id("h"), tok.token_to_id("i")]
  assert tok.decode(tok.encode("Hello, wörld 123!")) == "Hello, wörld 123!"
  assert tok.stop_ids == (2,)
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == (
      "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")

  # bfloat16 loading casts the same values.
  cfg16, params16, _ = loaders.load_gguf(path, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16" and params16["layers"]["attn_in"]["wqkv"].dtype == np.dtype(
      "bfloat16")
  np.testing.assert_allclose(np.asarray(params16["layers"]["attn_in"]["wqkv"], np.float32),
                             np.asarray(params["layers"]["attn_in"]["wqkv"]), rtol=1e-2, atol=1e-3)


def test_unpermuted_qk_give_llama_cpp_attention_scores():
  """Why the un-permutation is right: llama.cpp's interleaved RoPE on the GGUF (permuted) weights
  gives the same q.k scores as HF rotate_half RoPE on the HF weights."""
  rng = np.random.default_rng(2)
  n_head, hd, d = 2, 8, 16
  wq, wk = rng.standard_normal((n_head * hd, d)), rng.standard_normal((n_head * hd, d))
  x = rng.standard_normal((5, d))
  pos = np.arange(5)
  ang = pos[:, None] * (10000.0 ** (-np.arange(0, hd, 2) / hd))[None]  # [T, hd/2]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

  def rope_half(v):  # v [T, n, hd]; pairs (i, i + hd/2)
    a, b = v[..., :hd // 2], v[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

  def rope_interleaved(v):  # pairs (2i, 2i + 1)
    a, b = v[..., 0::2], v[..., 1::2]
    return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(v.shape)

  def scores(q, k):
    return np.einsum("tnh,snh->nts", q, k)

  hf = scores(rope_half((x @ wq.T).reshape(5, n_head, hd)),
              rope_half((x @ wk.T).reshape(5, n_head, hd)))
  gq, gk = hf_permute(wq, n_head), hf_permute(wk, n_head)
  cpp = scores(rope_interleaved((x @ gq.T).reshape(5, n_head, hd)),
               rope_interleaved((x @ gk.T).reshape(5, n_head, hd)))
  np.testing.assert_allclose(cpp, hf, rtol=1e-10, atol=1e-10)
  np.testing.assert_array_equal(loaders.unpermute_qk(gq, n_head), wq)
  np.testing.assert_array_equal(loaders.permute_qk(wq, n_head), gq)


def test_qwen2_gguf_is_not_unpermuted_and_has_biases(tmp_path):
  rng = np.random.default_rng(3)
  path = tmp_path / "qwen.gguf"
  # Qwen2 uses the llama tensor names plus q/k/v biases; metadata keys are qwen2.*; llama.cpp's
  # converter does not permute its q/k.
  vocab = tiny_vocab()
  w = gguf.GGUFWriter(str(path), "qwen2")
  for fn, val in [(w.add_block_count, 1), (w.add_context_length, 256), (w.add_embedding_length, D),
                  (w.add_feed_forward_length, F), (w.add_head_count, N), (w.add_head_count_kv, K),
                  (w.add_rope_freq_base, 1e6), (w.add_layer_norm_rms_eps, 1e-6)]:
    fn(val)
  ws = {
      "token_embd.weight": rng.standard_normal((len(vocab), D)),
      "output_norm.weight": rng.standard_normal(D),
      "blk.0.attn_norm.weight": rng.standard_normal(D),
      "blk.0.ffn_norm.weight": rng.standard_normal(D),
      "blk.0.attn_q.weight": rng.standard_normal((N * H, D)),
      "blk.0.attn_k.weight": rng.standard_normal((K * H, D)),
      "blk.0.attn_v.weight": rng.standard_normal((K * H, D)),
      "blk.0.attn_q.bias": rng.standard_normal(N * H),
      "blk.0.attn_k.bias": rng.standard_normal(K * H),
      "blk.0.attn_v.bias": rng.standard_normal(K * H),
      "blk.0.attn_output.weight": rng.standard_normal((D, N * H)),
      "blk.0.ffn_gate.weight": rng.standard_normal((F, D)),
      "blk.0.ffn_up.weight": rng.standard_normal((F, D)),
      "blk.0.ffn_down.weight": rng.standard_normal((D, F)),
  }
  for name, a in ws.items():
    w.add_tensor(name, a.astype(np.float32))
  _finish(w)
  cfg, params, tok = loaders.load_gguf(path)
  assert tok is None  # no tokenizer metadata in this file
  assert cfg.qkv_bias and cfg.norm_eps == 1e-6 and cfg.rope_theta == 1e6 and cfg.n_layers == 1
  ai = projections.attn_in(params["layers"]["attn_in"])
  np.testing.assert_array_equal(np.asarray(ai["wq"][0]),
                                ws["blk.0.attn_q.weight"].astype(np.float32).T.reshape(D, N, H))
  np.testing.assert_array_equal(np.asarray(ai["bk"][0]),
                                ws["blk.0.attn_k.bias"].astype(np.float32).reshape(K, H))
  assert ai["bq"].shape == (1, N, H) and ai["bv"].shape == (1, K, H)


def test_rope_scaling_from_factors_recovers_llama3_params():
  for theta, hd, factor, low, high in [(500000.0, 128, 8.0, 1.0, 4.0),
                                       (500000.0, 64, 32.0, 1.0, 4.0),
                                       (500000.0, 128, 16.0, 2.0, 8.0)]:
    f = llama3_rope_factors(theta, hd, factor, low, high, 8192)
    got = loaders.rope_scaling_from_factors(f, theta, hd, 8192)
    assert got == RopeScaling(factor, low, high, 8192)
  assert loaders.rope_scaling_from_factors(np.ones(64), 1e4, 128) is None


# ------------------------------------------------------------------------------------------------
# HF folders: the same weights as safetensors shards give the same params
# ------------------------------------------------------------------------------------------------

def test_load_hf_folder_matches_gguf(tmp_path):
  from safetensors.numpy import save_file

  rng = np.random.default_rng(4)
  gpath = tmp_path / "tiny.gguf"
  expect = write_tiny_llama(gpath, rng, tied=False)
  _, gparams, gtok = loaders.load_gguf(gpath)
  folder = tmp_path / "hf"
  folder.mkdir()
  shard1 = {"model.embed_tokens.weight": expect["embed"], "model.norm.weight": expect["final_norm"],
            "lm_head.weight": expect["lm_head"].astype(np.float16)}
  shard2 = {}
  names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
  for i in range(L):
    for key, hf_name in names.items():
      (shard1 if i == 0 else shard2)[f"model.layers.{i}.{hf_name}.weight"] = expect[f"{i}.{key}"]
  save_file(shard1, str(folder / "model-00001-of-00002.safetensors"))
  save_file(shard2, str(folder / "model-00002-of-00002.safetensors"))
  (folder / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tiny_vocab()),
      "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": N,
      "num_key_value_heads": K, "intermediate_size": F, "rope_theta": 500000.0,
      "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "tie_word_embeddings": False,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
  gtok.hf_tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
      "chat_template": TINY_TEMPLATE}))

  m = loaders.load_model(str(folder))
  cfg, params, tok = m
  assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and not cfg.tie_embeddings
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (L, D, N, K, H)
  _check_params(params, {**expect, "lm_head": expect["lm_head"].astype(np.float16)
                              .astype(np.float32)}, tied=False)
  for a, b in zip(np.asarray(params["layers"]["attn_in"]["wqkv"]),
                  np.asarray(gparams["layers"]["attn_in"]["wqkv"])):
    np.testing.assert_array_equal(a, b)
  assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2,))
  text = "the <|im_end|> a"
  assert tok.encode(text) == gtok.encode(text)
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == (
      gtok.apply_chat_template([{"role": "user", "content": "x"}]))


# ------------------------------------------------------------------------------------------------
# (c) errors
# ------------------------------------------------------------------------------------------------

def test_unsupported_architecture_raises(tmp_path):
  path = tmp_path / "gpt2.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(1)
  w.add_embedding_length(32)
  w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
  _finish(w)
  with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
    loaders.load_gguf(path)
  with pytest.raises(ValueError, match="gpt2"):
    loaders.load_model(str(path))


def test_missing_file_and_unknown_model(tmp_path):
  missing = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    loaders.load_gguf(missing)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    loaders.load_model(str(missing))
  with pytest.raises(ValueError, match="unknown model 'gpt-5'.*smollm2-135m"):
    loaders.load_model("gpt-5")
  with pytest.raises(FileNotFoundError, match="config.json"):
    loaders.load_hf(tmp_path)


def test_unsupported_hf_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                    "model_type": "mistral"}))
  with pytest.raises(ValueError, match="MistralForCausalLM.*LlamaForCausalLM"):
    loaders.load_hf(tmp_path)


# ------------------------------------------------------------------------------------------------
# The real file (metadata only: fast)
# ------------------------------------------------------------------------------------------------

def test_default_gguf_metadata_matches_preset():
  path = loaders.gguf_path_for_default()
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
  reader = loaders.open_gguf(path)
  cfg = loaders.config_from_gguf(reader, name="smollm2-135m")
  assert cfg == PRESETS["smollm2-135m"]
  types_ = {t.name: t.tensor_type for t in reader.tensors}
  assert types_["token_embd.weight"] == QT.Q8_0 and types_["blk.0.attn_q.weight"] == QT.Q4_1
  assert "output.weight" not in types_  # tied embeddings


def test_real_model_layout_and_next_token(real_model):
  cfg, params, tok = real_model
  assert cfg == PRESETS["smollm2-135m"]
  lay = params["layers"]
  assert params["embed"].shape == (49152, 576) and "lm_head" not in params
  assert lay["attn_in"]["wqkv"].shape == (30, 576, 3, 3 + 2, 64)  # 9 query, 3 KV heads
  assert lay["attn_out_mlp"]["wo"].shape == (30, 9, 64, 576)
  assert lay["attn_out_mlp"]["w_down"].shape == (30, 1536, 576)
  # End to end through the model: only right with correctly un-permuted q/k.
  import jax.numpy as jnp

  from models import llama
  ids = tok.encode("The quick brown fox jumps over the lazy")
  logits = llama.forward(params, cfg, jnp.asarray([ids], jnp.int32))
  assert tok.decode([int(jnp.argmax(logits[0, -1]))]) == " dog"
