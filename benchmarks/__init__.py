"""Benchmarks (run with `make bench`). Each module has a `main()` that prints its table."""
