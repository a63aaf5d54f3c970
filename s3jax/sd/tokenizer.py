"""CLIP's BPE tokenizer built with the `tokenizers` library (no hand-written BPE).

`CLIPTokenizer.from_dir(dir)` reads `vocab.json`, `merges.txt` and `tokenizer_config.json`
(transformers' CLIPTokenizer files) and assembles the pipeline transformers 5 uses for CLIP:
NFC + whitespace collapse + lowercase normaliser, CLIP's split regex then byte-level
pre-tokeniser, BPE with the `</w>` end-of-word suffix, and `<|startoftext|> ... <|endoftext|>`
around every sequence. Calling it returns int32 ids padded with the pad token.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

# The pre-tokeniser pattern of transformers' CLIPTokenizer (OpenAI's `pat`).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
DEFAULT_SPECIAL_TOKENS = dict(
    bos_token="<|startoftext|>",
    eos_token="<|endoftext|>",
    unk_token="<|endoftext|>",
    pad_token="<|endoftext|>",
)
PADDINGS = ("max_length", "longest")


def token_content(token: Any) -> str:
  """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
  return token["content"] if isinstance(token, dict) else str(token)


def build_tokenizer(
    vocab: dict, merges: list, bos_token: str, eos_token: str, unk_token: str, pad_token: str
) -> Tokenizer:
  """The `tokenizers.Tokenizer` transformers' (fast) CLIPTokenizer builds from vocab/merges."""
  tok = Tokenizer(
      models.BPE(
          vocab=vocab,
          merges=merges,
          dropout=None,
          continuing_subword_prefix="",
          end_of_word_suffix="</w>",
          fuse_unk=False,
          unk_token=unk_token,
      )
  )
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False),
      ]
  )
  tok.decoder = decoders.ByteLevel()
  specials = dict.fromkeys([bos_token, eos_token, unk_token, pad_token])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  for t in specials:
    if tok.token_to_id(t) is None:
      raise ValueError(f"special token {t!r} is not in the vocabulary")
  tok.post_processor = processors.RobertaProcessing(
      (eos_token, tok.token_to_id(eos_token)),
      (bos_token, tok.token_to_id(bos_token)),
      trim_offsets=False,
      add_prefix_space=False,
  )
  return tok


class CLIPTokenizer:
  """prompts -> int32 ids (N, max_length): bos, BPE tokens, eos, then pad tokens."""

  def __init__(self, tokenizer: Tokenizer, pad_token: str, model_max_length: int = 77):
    self.tokenizer = tokenizer
    self.pad_token_id = tokenizer.token_to_id(pad_token)
    self.model_max_length = model_max_length

  @classmethod
  def from_dir(cls, directory) -> "CLIPTokenizer":
    """Reads vocab.json, merges.txt and (optional) tokenizer_config.json of a tokenizer dir."""
    d = pathlib.Path(directory)
    config_path = d / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    special = {k: token_content(config.get(k) or v) for k, v in DEFAULT_SPECIAL_TOKENS.items()}
    vocab, merges = models.BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
    max_length = int(config.get("model_max_length", 77))
    if max_length > 10**6:  # transformers' "no limit" sentinel
      max_length = 77
    return cls(build_tokenizer(vocab, merges, **special), special["pad_token"], max_length)

  def __call__(
      self,
      prompts: Sequence[str],
      max_length: int = 77,
      truncation: bool = True,
      padding: str = "max_length",
  ) -> np.ndarray:
    """Token ids (N, L) int32.

    truncation=True keeps `bos, first max_length-2 tokens, eos`. padding='max_length' pads to
    max_length, 'longest' to the longest sequence; without truncation a longer sequence
    widens the batch (as transformers' ids would be; a text encoder then rejects them).
    """
    if isinstance(prompts, str):
      raise TypeError("prompts must be a sequence of strings, not a string")
    if padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    self.tokenizer.no_padding()
    if truncation:
      self.tokenizer.enable_truncation(max_length)
    else:
      self.tokenizer.no_truncation()
    ids = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
    width = max([len(i) for i in ids] + ([max_length] if padding == "max_length" else [0]))
    out = np.full((len(ids), width), self.pad_token_id, np.int32)
    for row, seq in zip(out, ids):
      row[: len(seq)] = seq
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one id sequence without special tokens (`</w>` read as a space)."""
    text = self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
    return text.replace("</w>", " ").strip()
