"""Training loops: the fusion ranker with its alignment and colour head (:mod:`~rerank.training.ranker`). Training
never imports :mod:`rerank.evaluation`; the harness imports training."""
