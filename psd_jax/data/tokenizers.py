"""Text tokenizers: CLIP's byte-level BPE and SentencePiece, both producing fixed-length int32
token arrays (batch, context_length) padded with 0.

The CLIP vocabulary file (`bpe_simple_vocab_16e6.txt.gz`) ships inside the open-clip-torch
wheel; `psd_jax.data.fetch.clip_vocab()` extracts it into the cache directory.
"""

from __future__ import annotations

import functools
import gzip
import html
import io
import os
import pathlib
from typing import Iterable, Protocol, Sequence

import ftfy
import numpy as np

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
_CLIP_MERGES = 49152 - 256 - 2


class Tokenizer(Protocol):
    vocab_size: int

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> np.ndarray: ...


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters, so that BPE
    merges operate on strings without whitespace or control characters."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    mapping = {b: chr(b) for b in printable}  # vocabulary order: printable bytes first
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def _clean(text: str) -> str:
    """open_clip's normalisation ('lower'): ftfy's text fixing (mojibake, curly quotes,
    ligatures, full-width characters), HTML unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return ' '.join(text.split()).lower()


def _padded(texts: str | Sequence[str], length: int, encode) -> np.ndarray:
    """Zero-padded int32 rows of `encode(list of texts)`; a single text gives one row (L,)."""
    single = isinstance(texts, str)
    rows = encode([texts] if single else list(texts))
    out = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = ids
    return out[0] if single else out


# open_clip's names of the start and end tokens: written in a caption, they are those tokens
SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')


class ClipTokenizer:
    """CLIP's byte-level BPE, exactly as open_clip 3.3 tokenises: 49,408 ids, start 49406, end
    49407 (a caption holding '<start_of_text>' or '<end_of_text>' gets those ids there; the
    older '<|endoftext|>' spelling is ordinary text).

    Texts longer than the context are truncated keeping the end-of-text token last (the text
    tower reads its feature there).
    """
    vocab_size = CLIP_VOCAB_SIZE

    def __init__(self, vocab_path: str | os.PathLike, context_length: int = CLIP_CONTEXT_LENGTH):
        import regex  # a dependency of the project; needed for the \\p{L} classes below

        path = pathlib.Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(
                f'CLIP BPE vocabulary not found at {path}: expected bpe_simple_vocab_16e6.txt.gz '
                '(run `python -m psd_jax.data.fetch clip_vocab` to extract it from the '
                'open-clip-torch wheel)')
        try:
            with gzip.open(path, 'rt', encoding='utf-8') as f:
                lines = f.read().split('\n')
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f'{path} is not a readable gzip BPE merges file: {e}') from e
        merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
        if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f'{path} does not hold CLIP\'s {_CLIP_MERGES} BPE merges')
        symbols = list(_byte_to_unicode().values())
        vocab = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = (self.encoder[t] for t in SPECIAL_TOKENS)
        self.context_length = context_length
        self._bytes = _byte_to_unicode()
        self._pattern = regex.compile(
            '|'.join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {t: [t] for t in SPECIAL_TOKENS}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + '</w>']
        while len(parts) > 1:  # merge the best-ranked adjacent pair, everywhere, until none
            best = min(zip(parts[:-1], parts[1:]), key=lambda p: self.ranks.get(p, np.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of one text without start/end tokens."""
        ids = []
        for word in self._pattern.findall(_clean(text)):
            mapped = ''.join(self._bytes[b] for b in word.encode('utf-8'))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> np.ndarray:
        """(N,) texts -> (N, context_length) int32: <sot> ids <eot>, zero-padded."""
        length = context_length or self.context_length
        return _padded(texts, length,
                       lambda batch: [[self.sot] + self.encode(t)[:length - 2] + [self.eot]
                                      for t in batch])


class SentencePieceTokenizer:
    """A SentencePiece model by path; ids shifted so that 0 is padding, end-of-sequence appended
    (use the text tower's `pool='last'`)."""

    def __init__(self, model_path: str | os.PathLike | bytes, context_length: int = 32):
        import sentencepiece as spm

        if isinstance(model_path, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model_path)
        else:
            path = pathlib.Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f'SentencePiece model not found at {path}: expected a '
                                        '.model file written by SentencePieceTrainer')
            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(str(path))
            except (OSError, RuntimeError) as e:
                raise ValueError(f'{path} is not a readable SentencePiece model: {e}') from e
        self.vocab_size = self.sp.GetPieceSize() + 1  # +1: id 0 is padding
        self.eos = self.sp.eos_id() + 1
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> np.ndarray:
        """(N,) texts -> (N, context_length) int32: ids <eos>, zero-padded."""
        length = context_length or self.context_length
        return _padded(texts, length,
                       lambda batch: [[i + 1 for i in ids][:length - 1] + [self.eos]
                                      for ids in self.sp.EncodeAsIds([_clean(t) for t in batch])])


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 1000,
                        model_type: str = 'unigram') -> bytes:
    """Train a small SentencePiece model on captions (e.g. the emoji demo's); returns the model
    proto, to be saved to a file or passed to `SentencePieceTokenizer`."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_clean(t) for t in texts]), model_writer=buffer,
        vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
        hard_vocab_limit=False, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        minloglevel=2)
    return buffer.getvalue()
