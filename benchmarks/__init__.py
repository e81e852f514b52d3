"""Benchmark scripts (run on a GPU machine: bash benchmarks/gpu_suite.sh); shared helpers in common.py."""
