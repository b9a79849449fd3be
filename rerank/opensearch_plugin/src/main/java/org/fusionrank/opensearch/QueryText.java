package org.fusionrank.opensearch;

import java.io.IOException;
import java.util.List;
import java.util.Map;

import org.opensearch.common.xcontent.XContentFactory;
import org.opensearch.common.xcontent.XContentHelper;
import org.opensearch.common.xcontent.XContentType;
import org.opensearch.core.common.bytes.BytesReference;
import org.opensearch.core.xcontent.ToXContent;
import org.opensearch.core.xcontent.XContentBuilder;
import org.opensearch.index.query.QueryBuilder;

/**
 * The query text of a search when {@code ext.fusionrank.query_text} does not give it: the first string under a
 * {@code query} or {@code query_text} key of the query, depth first in the query's own order. That covers
 * {@code match}, {@code match_phrase}, {@code multi_match}, {@code query_string}, {@code simple_query_string},
 * {@code combined_fields} and neural-search's {@code neural}, alone or inside {@code bool} / {@code hybrid}
 * (whose first sub-query is normally the lexical one). A query with no text ({@code match_all}, {@code knn}
 * by vector) gives null: the caller must then send {@code query_text}.
 */
final class QueryText {

    private QueryText() {}

    static String of(final QueryBuilder query) throws IOException {
        if (query == null) {
            return null;
        }
        final XContentBuilder b = XContentFactory.jsonBuilder();
        query.toXContent(b, ToXContent.EMPTY_PARAMS);
        final Map<String, Object> map = XContentHelper.convertToMap(BytesReference.bytes(b), true, XContentType.JSON).v2();
        return find(map);
    }

    static String find(final Object node) {
        if (node instanceof Map<?, ?> m) {
            for (final Map.Entry<?, ?> e : m.entrySet()) {
                if (("query".equals(e.getKey()) || "query_text".equals(e.getKey())) && e.getValue() instanceof String s && !s.isBlank()) {
                    return s;
                }
                final String inner = find(e.getValue());
                if (inner != null) {
                    return inner;
                }
            }
        } else if (node instanceof List<?> l) {
            for (final Object o : l) {
                final String inner = find(o);
                if (inner != null) {
                    return inner;
                }
            }
        }
        return null;
    }
}
