"""Raw input as the line produces it -> the model's input, exactly as manifest.json's "preprocessing" says.

The one implementation of edgecc's preprocessing: `edgecc build` (edgecc.data) imports the tokenizer and
the image conversion from here, and the board runs this file as it is (numpy, the standard library, and
Pillow for images), so the board feeds the model exactly what the build's evaluation fed it.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9]")
TOKENIZER = (f'lowercase, then re.findall(r"{TOKEN.pattern}", text); words not in the vocabulary -> unknown_id; '
             "cut to sequence_length or padded at the end with padding_id")
STANDARDIZE_EPSILON = 1e-3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
TEXT_SUFFIX = ".txt"
ARRAY_SUFFIX = ".npy"
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADERS_KEPT = 64


class BadInput(ValueError):
    """An input the model cannot take (unreadable, wrong shape or type): rejected, the service goes on."""


def tokenize(text: str) -> list[str]:
    """The words of `text` as the vocabulary knows them (the rule `TOKENIZER` states)."""
    return TOKEN.findall(text.lower())


def token_ids(words: Sequence[str], ids: Mapping[str, int], length: int, padding_id: int,
              unknown_id: int) -> np.ndarray:
    """`words` as int32 vocabulary ids, cut to `length` or padded at the end."""
    encoded = np.full(length, padding_id, dtype=np.int32)
    found = [ids.get(word, unknown_id) for word in words[:length]]
    encoded[: len(found)] = found
    return encoded


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

    def text(self, text: str) -> np.ndarray:
        pre = self.pre
        if not self.is_text:
            raise BadInput("is text (or names no file), and this model does not take text")
        if pre.get("tokenizer") != TOKENIZER:  # MiniLM's WordPiece is HuggingFace's `tokenizers`, not redone here
            raise BadInput("is text, but this model's tokenizer (manifest preprocessing.tokenizer) is not edgecc's "
                           "word tokenizer: it needs the `tokenizers` package; send token ids as a .npy instead")
        return token_ids(tokenize(text), self.ids, int(pre["sequence_length"]), int(pre["padding_id"]),
                         int(pre["unknown_id"]))

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
