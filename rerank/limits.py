"""Limits on query input (pure functions, no I/O): one rule, checked where a query enters.

A query text longer than :data:`MAX_QUERY_CHARS` characters (after stripping surrounding whitespace) is
refused with :class:`~indexing.errors.ConfigError` naming the limit; it is not truncated silently, so a
caller that pastes a whole document learns why its results would be meaningless. The limit is far above
any search-box query and above what the text encoder reads (MiniLM truncates at 256 word pieces, about
1,000 characters of English); past it, BM25 would only spend time on thousands of OR-ed terms.
NUL bytes are refused too (they reach no analyzer usefully and break some logs and stores).

``check_query_text(query)`` returns the stripped text. The retriever calls it in
:meth:`rerank.retrieval.retriever.Retriever.first_stage`; the rerank call should call it in its argument check.
"""

from __future__ import annotations

from typing import Any

from indexing.errors import ConfigError

#: longest accepted query text, in characters (Unicode code points) after stripping
MAX_QUERY_CHARS = 2048


def check_query_text(query: Any, *, max_chars: int = MAX_QUERY_CHARS) -> str:
    """The stripped query text; ConfigError when it is not a string, holds a NUL byte or is too long.

    An empty result is allowed here (an image-only query has no text); callers decide whether text is required.
    """
    if not isinstance(query, str):
        raise ConfigError(f"query must be a string, got {type(query).__name__}")
    text = query.strip()
    if len(text) > max_chars:
        raise ConfigError(f"query too long: {len(text)} characters (limit {max_chars}); shorten the query text")
    if "\x00" in text:
        raise ConfigError("query contains a NUL character")
    return text


__all__ = ["MAX_QUERY_CHARS", "check_query_text"]
