"""Parts of ``benchmark/bench_serving.py``: datasets, request functions, metrics.

Requests and metric definitions follow SGLang's ``sglang.bench_serving`` (0.5.x) so that
figures from either client compare; the code is this project's own.
"""
