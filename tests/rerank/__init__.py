"""Tests of the rerank package."""
