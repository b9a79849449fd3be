"""fusionrank.rerank: retrieval, features, fusion model, user history store, training, evaluation, rerank API and service."""
