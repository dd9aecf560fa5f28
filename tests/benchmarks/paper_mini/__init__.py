"""Paper-mini: GCFG and the concept UNet measured on a small captioned world, trained from scratch here.

Run `python tests/benchmarks/paper_mini/run.py --help`; the README's "Does it work?" section has the results.
"""
