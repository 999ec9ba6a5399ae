"""``selectmoe demo``: generated corpora with planted defects, offline eval sets, tiny models.

Not part of the product's core: no stage imports it. Benchmarks and tests use its generators and
tiny models; the tiny tokenizer needs the ``demo`` extra (``mistral-common``).
"""
