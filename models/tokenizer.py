"""Tokenizer and chat template for the Llama family, on top of HF `tokenizers`.

Two sources build the same `Tokenizer`:
- `Tokenizer.from_gguf_metadata(reader)`: rebuilds a byte-level BPE tokenizer from the
  `tokenizer.ggml.*` metadata of a GGUF file (tokens, merges, token types, the pre-tokenizer name),
  so a GGUF file alone is enough to run a model (no model hub on our machines).
- `Tokenizer.from_hf_folder(folder)`: `tokenizer.json` + `tokenizer_config.json` of a Hugging Face
  checkpoint folder.

Chat templates are Jinja2, rendered the way `transformers` renders them (sandboxed environment,
trim_blocks and lstrip_blocks, a `raise_exception` helper, the `tojson` filter), so prompts match
what the model was trained on.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (from the HF
# tokenizer.json files of those models). Anything not listed falls back to GPT-2's ByteLevel regex.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX_BY_PRE = {
    "llama-bpe": _LLAMA3_REGEX,
    "llama3": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX,
}

# End-of-turn markers of common chat templates; any of them that the template uses (and the vocab
# has) joins eos in `stop_ids`.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def _gguf_field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _raise_exception(message):
  raise TemplateError(message)


class TemplateError(ValueError):
  """Raised by a chat template's `raise_exception(...)` (e.g. roles out of order)."""


class Tokenizer:
  """A byte-level BPE tokenizer with the model's special ids and chat template.

  Attributes:
    vocab_size: number of token ids (base vocab plus added tokens).
    bos_id, eos_id: special ids (bos may be None when the model has none).
    stop_ids: ids that end generation: eos plus the template's end-of-turn token (e.g. <|im_end|>).
    chat_template: Jinja2 source, or None.
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
               chat_template: str | None = None, extra_stop_ids: Sequence[int] = ()):
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.chat_template = chat_template
    self._compiled_template = None
    stops = [] if eos_id is None else [eos_id]
    if chat_template:
      for t in _END_OF_TURN_TOKENS:
        tid = tok.token_to_id(t)
        if t in chat_template and tid is not None:
          stops.append(tid)
    stops.extend(int(i) for i in extra_stop_ids)
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # ordered, unique

  def __getstate__(self) -> dict:
    # A tokenizer crosses processes (engine replicas send theirs to the job's driver); the
    # compiled chat template (a jinja2 object) does not pickle: it is rebuilt on first use.
    return self.__dict__ | {"_compiled_template": None}

  # ----------------------------------------------------------------------------------------------
  # Construction
  # ----------------------------------------------------------------------------------------------

  @classmethod
  def from_gguf_metadata(cls, reader) -> "Tokenizer":
    """Builds the tokenizer from a `gguf.GGUFReader`'s `tokenizer.ggml.*` metadata."""
    model_type = _gguf_field(reader, "tokenizer.ggml.model")
    if model_type is None:
      raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    if model_type != "gpt2":
      raise ValueError(
          f"unsupported GGUF tokenizer model {model_type!r}: only byte-level BPE ('gpt2') is "
          "supported")
    tokens: list[str] = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges_raw: list[str] = _gguf_field(reader, "tokenizer.ggml.merges", [])
    token_types = _gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError("GGUF tokenizer has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)

    if pre == "smollm":
      # SmolLM's tokenizer.json: digits split one by one, then GPT-2 byte level.
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ])
    elif pre in _SPLIT_REGEX_BY_PRE:
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(tokenizers.Regex(_SPLIT_REGEX_BY_PRE[pre]), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ])
    else:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>, ...) must match whole, before BPE, and be
    # skippable on decode; user-defined ones match whole but are ordinary text on decode.
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if int(t) == _TOKEN_TYPE_CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if int(t) == _TOKEN_TYPE_USER_DEFINED]
    if special:
      tok.add_special_tokens(special)
    if user:
      tok.add_tokens(user)

    def _id(key):
      v = _gguf_field(reader, key)
      return None if v is None else int(v)

    bos_id = _id("tokenizer.ggml.bos_token_id")
    eos_id = _id("tokenizer.ggml.eos_token_id")
    if _gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
      bos = tokens[bos_id]
      tok.post_processor = processors.TemplateProcessing(
          single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    extra = [i for i in (_id("tokenizer.ggml.eot_token_id"),) if i is not None]
    return cls(tok, bos_id=bos_id, eos_id=eos_id,
               chat_template=_gguf_field(reader, "tokenizer.chat_template"), extra_stop_ids=extra)

  @classmethod
  def from_hf_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
    """Loads `tokenizer.json` (+ `tokenizer_config.json`, chat template) from a HF folder."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder}")
    tok = tokenizers.Tokenizer.from_file(path)
    cfg: dict = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)

    def _token_id(value):
      if isinstance(value, Mapping):
        value = value.get("content")
      return None if value is None else tok.token_to_id(value)

    bos_id = _token_id(cfg.get("bos_token"))
    eos_id = _token_id(cfg.get("eos_token"))
    # Newer checkpoints keep the template in its own file; some keep a list of named templates.
    template = cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    json_path = os.path.join(folder, "chat_template.json")
    if template is None and os.path.exists(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        template = f.read()
    elif template is None and os.path.exists(json_path):
      with open(json_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), None))
    extra = []
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
      with open(gen_path, encoding="utf-8") as f:
        gen_eos = json.load(f).get("eos_token_id")
      extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
      if eos_id is None and extra:
        eos_id = extra[0]
    return cls(tok, bos_id=bos_id, eos_id=eos_id, chat_template=template, extra_stop_ids=extra)

  # ----------------------------------------------------------------------------------------------
  # Encoding and decoding
  # ----------------------------------------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. Special-token strings in the text (e.g. <|im_start|>) map to their ids.

    add_special_tokens=True adds what the tokenizer's post-processor adds (e.g. bos).
    """
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts),
                                                  add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`. Raises ValueError on an id outside [0, vocab_size)."""
    ids = [int(i) for i in ids]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is out of vocabulary (vocab_size={self.vocab_size})")
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tok

  # ----------------------------------------------------------------------------------------------
  # Chat template
  # ----------------------------------------------------------------------------------------------

  def _template(self):
    if self._compiled_template is None:
      if not self.chat_template:
        raise ValueError("this tokenizer has no chat template")
      # Import here: jinja2 is only needed for chat prompts.
      from jinja2 import ext
      from jinja2.sandbox import ImmutableSandboxedEnvironment

      env = ImmutableSandboxedEnvironment(
          trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])

      def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

      env.filters["tojson"] = tojson
      env.globals["raise_exception"] = _raise_exception
      env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
      self._compiled_template = env.from_string(self.chat_template)
    return self._compiled_template

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders messages ([{"role": ..., "content": ...}, ...]) with the model's chat template."""
    def tok_str(i):
      return None if i is None else self._tok.id_to_token(i)

    return self._template().render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
        bos_token=tok_str(self.bos_id) or "", eos_token=tok_str(self.eos_id) or "", **kwargs)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of the rendered chat prompt (special tokens in it become their ids).

    No bos is added beyond what the template writes (templates that want bos write it).
    """
    return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"stop_ids={self.stop_ids})")


class ByteTokenizer:
  """A synthetic tokenizer for random-weight models (benchmarks, tests): text in is one id per
  UTF-8 byte (ids 3..258), and every id out is one character (chr(0x10000 + id)), which encodes
  back to that id, so a model's answer resent in a later turn is the same tokens. A plain chat
  template (`<role>content\\n`, `<assistant>` to generate); no stop ids: a request runs to its
  max_tokens."""

  OFFSET = 3
  CHAR_BASE = 0x10000

  def __init__(self, vocab_size: int):
    if vocab_size < self.OFFSET + 256:
      raise ValueError(f"a byte tokenizer needs a vocabulary of at least {self.OFFSET + 256} "
                       f"ids, got {vocab_size}")
    self.vocab_size = vocab_size
    self.bos_id = self.eos_id = None
    self.stop_ids: tuple[int, ...] = ()
    self.chat_template = "<role>content\\n"

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids: list[int] = []
    for ch in text:
      code = ord(ch) - self.CHAR_BASE
      if 0 <= code < self.vocab_size:
        ids.append(code)
      else:
        ids.extend(b + self.OFFSET for b in ch.encode())
    return ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return "".join(chr(self.CHAR_BASE + int(i)) for i in ids)

  def apply_chat_template(self, messages, add_generation_prompt: bool = False, **_) -> str:
    text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")
