"""Everything that needs the training extra (`pip install "edgecc[train]"`): TensorFlow for training,
pruning, sparsity, QAT, distillation and conversion, and matplotlib for the build report's plots.

This sub-package is the boundary. The rest of edgecc (reading, checking,
profiling, running, shadowing and verifying int8 models) must stay importable
and usable on the base install, which tests/test_boundary.py proves and CI's
base-install job runs.
"""
