"""Raw input as the line produces it -> the model's input, exactly as manifest.json's "preprocessing" says.

The one implementation of edgecc's preprocessing: `edgecc build` (edgecc.data) imports the tokenizer and
the image conversion from here, and the board runs this file as it is (numpy, the standard library, and
Pillow for images), so the board feeds the model exactly what the build's evaluation fed it. A MiniLM build
tokenizes with HuggingFace's `tokenizers` (Rust, not on the board); `wordpiece` redoes its BERT WordPiece in
plain Python, and tests/test_wordpiece.py holds the two to the same ids.
"""

from __future__ import annotations

import functools
import io
import itertools
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9]")
TOKENIZER = (f'lowercase, then re.findall(r"{TOKEN.pattern}", text); words not in the vocabulary -> unknown_id; '
             "cut to sequence_length or padded at the end with padding_id")
# what edgecc.train.minilm's tokenizer description says of its rules; a manifest's tokenizer naming them is
# tokenized by `wordpiece`
WORDPIECE = ("BERT normaliser (clean text, lower case, accents stripped, Chinese characters split), WordPiece, "
             "[CLS] ... [SEP]")
BERT_SPECIAL = re.compile(r"\[(?:PAD|UNK|CLS|SEP|MASK)\]")  # matched in the raw text, before any normalising
WORDPIECE_LONGEST_WORD = 100  # characters; a longer word is [UNK] (max_input_chars_per_word)
# CJK Unified Ideographs and their extensions: BERT puts spaces around each, so each is a word of its own
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
ASCII_CONTROLS = dict.fromkeys((*range(32), 127))  # str.translate drops them
# BERT's white space: what str.isspace() calls so (all below U+3001), less the control characters it drops instead
BERT_SPACE = "".join(c for c in map(chr, range(0x3001))
                     if c.isspace() and (c in "\t\n\r" or unicodedata.category(c) != "Cc"))
BERT_CHUNK = re.compile(f"[^{re.escape(BERT_SPACE)}]+")
ASCII_WORD = re.compile(r"[!-/:-@\[-`{-~]|[^!-/:-@\[-`{-~]+")  # an ASCII punctuation mark, or a run of none
STANDARDIZE_EPSILON = 1e-3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
TEXT_SUFFIX = ".txt"
ARRAY_SUFFIX = ".npy"
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADERS_KEPT = 64


class BadInput(ValueError):
    """An input the model cannot take (unreadable, wrong shape or type): rejected, the service goes on."""


def tokenize(text: str, limit: int | None = None) -> list[str]:
    """The words of `text` as the vocabulary knows them (the rule `TOKENIZER` states); the first `limit` only, found
    without tokenizing the rest (a long line costs little more than a short one)."""
    return [match.group() for match in itertools.islice(TOKEN.finditer(text.lower()), limit)]


def token_ids(words: Sequence[str], ids: Mapping[str, int], length: int, padding_id: int,
              unknown_id: int) -> np.ndarray:
    """`words` as int32 vocabulary ids, cut to `length` or padded at the end."""
    encoded = np.full(length, padding_id, dtype=np.int32)
    found = [ids.get(word, unknown_id) for word in words[:length]]
    encoded[: len(found)] = found
    return encoded


def _bert_normalised(chunk: str) -> str:
    """BERT's normaliser on a chunk without white space: control characters dropped, a space either side of each
    CJK ideograph, accents stripped (NFD, then no nonspacing marks), lower case."""
    if chunk.isascii():  # the usual line: no ideograph, no accent, so the controls and the case are all there is
        return chunk.translate(ASCII_CONTROLS).lower()
    kept = []
    for char in chunk:
        if char == "\ufffd" or unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs"):
            continue
        kept.append(f" {char} " if any(low <= ord(char) <= high for low, high in CJK) else char)
    stripped = "".join(c for c in unicodedata.normalize("NFD", "".join(kept)) if unicodedata.category(c) != "Mn")
    # each character on its own, as Rust's char::to_lowercase: str.lower() makes a word's last capital sigma "ς"
    return "".join(c.lower() for c in stripped) if "Σ" in stripped else stripped.lower()


def _is_punctuation(char: str) -> bool:
    return (char.isascii() and not char.isalnum() and char.isprintable() and not char.isspace()) \
        or unicodedata.category(char).startswith("P")


def _bert_words(chunk: str) -> Iterator[str]:
    """BERT's pre-tokenizer on normalised text without white space: each punctuation mark a word of its own."""
    if chunk.isascii():
        yield from ASCII_WORD.findall(chunk)
        return
    start = 0
    for i, char in enumerate(chunk):
        if _is_punctuation(char):
            if i > start:
                yield chunk[start:i]
            yield char
            start = i + 1
    if start < len(chunk):
        yield chunk[start:]


def _word_pieces(word: str, ids: Mapping[str, int], unknown_id: int) -> list[int]:
    """WordPiece: the longest vocabulary entry from the left, then from where it ended with the "##" prefix; a
    word with a part no entry matches, or longer than WORDPIECE_LONGEST_WORD, is [UNK] whole."""
    if len(word) > WORDPIECE_LONGEST_WORD:
        return [unknown_id]
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = ids.get(word[start:end] if start == 0 else f"##{word[start:end]}")
            if piece is not None:
                break
        else:
            return [unknown_id]
        pieces.append(piece)
        start = end
    return pieces


def wordpiece(text: str, ids: Mapping[str, int], length: int, padding_id: int, unknown_id: int) -> np.ndarray:
    """`text` as BERT's WordPiece tokenizer gives it (HuggingFace `tokenizers` with all-MiniLM-L6-v2's
    tokenizer.json): [CLS], the pieces cut to `length` - 2, [SEP], then `padding_id` to `length`. A special token
    written in the text ("[MASK]") is that token, as `tokenizers` matches them before normalising.

    The characters' classes (control, punctuation, accent) come from Python's unicodedata. With Python 3.11
    (Unicode 14) and tokenizers 0.23, "a" + c + "b" gives the same ids for 281,471 of the 282,230 assigned code
    points c; the other 759 are characters assigned since tokenizers' Unicode tables (e.g. U+0890, an Arabic
    pound mark), which tokenizers takes for unassigned letters."""
    found = list(itertools.islice(_pieces(text, ids, unknown_id), length - 2))
    encoded = np.full(length, padding_id, dtype=np.int32)
    kept = [ids["[CLS]"], *found, ids["[SEP]"]]
    encoded[: len(kept)] = kept
    return encoded


def _pieces(text: str, ids: Mapping[str, int], unknown_id: int) -> Iterator[int]:
    """The ids of `text`'s word pieces, one white-space-free chunk at a time, so that a caller taking the first few
    normalises no further (BERT's normaliser and pre-tokenizer never join or split across white space); one chunk
    is read whole, about a microsecond a character where it is not ASCII."""
    start = 0
    for special in itertools.chain(BERT_SPECIAL.finditer(text), [None]):
        end = special.start() if special else len(text)
        for chunk in BERT_CHUNK.finditer(text, start, end):
            for part in _bert_normalised(chunk.group()).split():  # a CJK ideograph comes out spaced
                for word in _bert_words(part):
                    yield from _word_pieces(word, ids, unknown_id)
        if special:
            yield ids.get(special.group(), unknown_id)
            start = special.end()


def pixels(image: Any, height: int, width: int, channels: int) -> np.ndarray:
    """A Pillow image as 0..255 float32 pixels (height, width, channels): grey or RGB, resized bilinearly."""
    from PIL import Image

    converted = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.float32).reshape(height, width, channels)


_npy_headers: dict[bytes, tuple[np.dtype, int, tuple[int, ...], str]] = {}  # dtype, count, shape, order


def npy_array(data: bytes) -> np.ndarray:
    """A .npy file's array (never a pickle). numpy parses each header with ast.literal_eval, half of an input's
    time on the board; a line's inputs share a few headers, so each distinct header is parsed by numpy once and
    the arrays behind it are read straight from the bytes."""
    if not data.startswith(NPY_MAGIC) or len(data) < 10:  # else numpy takes it for a pickle and advises unpickling
        raise BadInput("is not a .npy file (it lacks the .npy header)")
    start = 10 if data[6] == 1 else 12  # format 1.0: a 2-byte header length; 2.0 and 3.0: 4 bytes
    end = start + int.from_bytes(data[8:start], "little")
    known = _npy_headers.get(data[:end])
    if known is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
        if len(_npy_headers) >= NPY_HEADERS_KEPT:
            _npy_headers.clear()
        _npy_headers[data[:end]] = (array.dtype, array.size, array.shape, "F" if fortran else "C")
        return array
    dtype, count, shape, order = known
    return np.frombuffer(data, dtype, count=count, offset=end).reshape(shape, order=order)


class Preprocessor:
    """One manifest's "preprocessing": raw text, an image file or an array -> the float (or token id) model input."""

    def __init__(self, pre: Mapping[str, Any]) -> None:
        self.pre = pre
        self.shape = tuple(int(d) for d in pre["model_input_shape"][1:])
        self.size = int(np.prod(self.shape))
        self.is_text = "vocabulary" in pre
        self.ids = {word: i for i, word in enumerate(pre["vocabulary"])} if self.is_text else {}
        self.marked = "[CLS]" in self.ids and "[SEP]" in self.ids  # WordPiece's sequence marks

    def text(self, text: str) -> np.ndarray:
        pre = self.pre
        if not self.is_text:
            raise BadInput("is text (or names no file), and this model does not take text")
        length = int(pre["sequence_length"])
        arguments = (self.ids, length, int(pre["padding_id"]), int(pre["unknown_id"]))
        tokenizer = pre.get("tokenizer", "")
        if tokenizer == TOKENIZER:
            return token_ids(tokenize(text, length), *arguments)
        if WORDPIECE not in tokenizer:
            raise BadInput("is text, but this model's tokenizer (manifest preprocessing.tokenizer) is neither edgecc's "
                           "word tokenizer nor BERT's WordPiece; send token ids as a .npy instead")
        if not self.marked:
            raise BadInput("is text, but the manifest's preprocessing.vocabulary lacks [CLS] or [SEP], which BERT's "
                           "WordPiece puts around every text")
        return wordpiece(text, *arguments)

    def array(self, raw: np.ndarray) -> np.ndarray:
        """Raw values (any shape with the input's element count) -> x = raw * scale + offset, standardized if so."""
        if raw.dtype.kind not in "iuf":
            raise BadInput(f"holds {raw.dtype} values; the model takes numbers")
        if raw.size != self.size:
            raise BadInput(f"holds an array of shape {raw.shape}; the model takes {self.shape} ({self.size} values)")
        if self.is_text:
            return raw.astype(np.int32).reshape(self.shape)
        x = raw.astype(np.float32).reshape(self.shape) * self.pre["scale"] + self.pre["offset"]
        if not np.isfinite(x.sum(dtype=np.float64)):  # one pass: a float32 sum in float64 cannot overflow
            raise BadInput("holds NaN or an infinity")
        if "standardize" in self.pre:
            x = (x - x.mean()) / (x.std() + STANDARDIZE_EPSILON)
        return x.astype(np.float32)

    def load(self, suffix: str, data: bytes) -> np.ndarray:
        """An input file's bytes, its kind told by its suffix: .npy (the raw values), .txt (one text), or an image."""
        suffix = suffix.lower()
        try:
            if suffix == ARRAY_SUFFIX:
                return self.array(npy_array(data))
            if suffix == TEXT_SUFFIX and self.is_text:
                return self.text(data.decode("utf-8"))
            if suffix in IMAGE_SUFFIXES and not self.is_text and len(self.shape) == 3:
                try:
                    from PIL import Image
                except ImportError:
                    raise BadInput("is an image; reading images on this board needs Pillow: pip install pillow") \
                        from None
                with Image.open(io.BytesIO(data)) as opened:
                    return self.array(pixels(opened, *self.shape))
        except BadInput:
            raise
        except (OSError, ValueError, EOFError, UnicodeDecodeError) as err:
            reason = " ".join(str(err).split(". ")[0].split()) or type(err).__name__  # numpy's advice is not for users
            raise BadInput(f"cannot be read: {reason}") from None
        kinds = "a .txt file of text, or a .npy of token ids" if self.is_text else \
            f"a .npy array{' or an image (' + ', '.join(IMAGE_SUFFIXES) + ')' if len(self.shape) == 3 else ''}"
        raise BadInput(f"is not an input this model takes ({kinds})")


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """q = clip(round(x / scale) + zero_point) in `dtype`; a scale of 0 means the model takes x as it is."""
    if not scale or np.dtype(dtype).kind == "f":
        return x.astype(dtype)
    lowest, highest = _integer_range(np.dtype(dtype))
    return np.clip(np.round(x / scale) + zero_point, lowest, highest).astype(dtype)


@functools.cache
def _integer_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)  # a few microseconds a call, on every input
    return int(info.min), int(info.max)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return q.astype(np.float32) if not scale else (q.astype(np.float32) - zero_point) * scale
