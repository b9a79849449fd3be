"""What training and evaluation share: query and judgment readers (:mod:`~rerank.datasets.data`), seeded splits
(:mod:`~rerank.datasets.splits`), ranking metrics (:mod:`~rerank.datasets.metrics`), click models and the judgments
derived from a UBI log (:mod:`~rerank.datasets.clicks`, :mod:`~rerank.datasets.ubi_judgments`), the labelled photos the
attribute heads learn from (:mod:`~rerank.datasets.attribute_photos`) and the evaluation index with its per-query
items (:mod:`~rerank.datasets.pools`)."""
