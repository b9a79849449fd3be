"""fusionrank.indexing: catalogs, encoders, documents, search-engine adapters, bulk pipeline, index lifecycle.

Nothing here imports :mod:`rerank` or :mod:`workers` (dependencies point one way).
"""
