"""Speed and accuracy benchmarks against peer frameworks; writes tables and plots."""
