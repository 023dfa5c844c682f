"""Operator benchmarks (``pytest benchmarks``); a package so that the suites can import the
shared helpers of ``benchmarks/conftest.py`` by one unambiguous name."""
