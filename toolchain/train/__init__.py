"""Everything that needs TensorFlow: training, pruning, sparsity, QAT, distillation and conversion.

This sub-package is the TensorFlow boundary. It needs the training extra
(`pip install "edgecc[train]"`); the rest of edgecc (reading, checking,
profiling, running and verifying int8 models) must stay importable without it,
which tests/test_boundary.py proves.
"""
