"""The first stage: the retriever over either engine (:mod:`~rerank.retrieval.retriever`), score fusion
(:mod:`~rerank.retrieval.fusion`), the per-list signals the ranker reads (:mod:`~rerank.retrieval.signals`) and
the OpenSearch request bodies of hybrid search and search pipelines (:mod:`~rerank.retrieval.opensearch_bodies`,
:mod:`~rerank.retrieval.opensearch_pipeline`)."""
