package org.fusionrank.opensearch;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.io.IOException;
import java.util.Map;

import org.junit.jupiter.api.Test;
import org.opensearch.common.xcontent.json.JsonXContent;
import org.opensearch.core.xcontent.DeprecationHandler;
import org.opensearch.core.xcontent.NamedXContentRegistry;
import org.opensearch.core.xcontent.XContentParser;
import org.opensearch.index.query.QueryBuilders;

class QueryTextAndExtTests {

    @Test
    void theFirstQueryTextOfTheQuery() throws IOException {
        assertEquals("red dress", QueryText.of(QueryBuilders.matchQuery("title", "red dress")));
        assertEquals("red dress", QueryText.of(QueryBuilders.multiMatchQuery("red dress", "title", "description")));
        assertEquals("shoes", QueryText.of(QueryBuilders.boolQuery().filter(QueryBuilders.termQuery("gender", "Men"))
            .must(QueryBuilders.matchPhraseQuery("title", "shoes"))));
        assertNull(QueryText.of(QueryBuilders.matchAllQuery()));
        assertNull(QueryText.of(null));
        // hybrid / neural are other plugins' builders: their JSON form is what counts
        assertEquals("black shoes", QueryText.find(Map.of("hybrid", Map.of("queries", java.util.List.of(
            Map.of("knn", Map.of("vec", Map.of("vector", java.util.List.of(0.1, 0.2), "k", 5))),
            Map.of("neural", Map.of("text_vec", Map.of("query_text", "black shoes", "k", 5))))))));
    }

    private static FusionrankExt parse(final String json) throws IOException {
        try (XContentParser p = JsonXContent.jsonXContent.createParser(NamedXContentRegistry.EMPTY, DeprecationHandler.THROW_UNSUPPORTED_OPERATION, json)) {
            p.nextToken();
            return FusionrankExt.parse(p);
        }
    }

    @Test
    void theRequestSection() throws IOException {
        final FusionrankExt e = parse("{\"user_id\":\"u1\",\"query_text\":\"red dress\"}");
        assertEquals("u1", e.userId());
        assertEquals("red dress", e.queryText());
        assertNull(parse("{}").userId());
        assertEquals("[ext.fusionrank] unknown key [user]; valid: diversity, query_text, user_id",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"user\":\"u1\"}")).getMessage());
        assertEquals("[ext.fusionrank.user_id] must be a non-empty string, got Integer",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"user_id\":7}")).getMessage());
        assertEquals("[ext.fusionrank.user_id] must be a non-empty string, got String",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"user_id\":\" \"}")).getMessage());
    }

    @Test
    void theDiversityIsANumberInTheUnitRangeOrAuto() throws IOException {
        assertEquals("auto", parse("{\"diversity\":\"auto\"}").diversity());
        assertEquals(0.3, ((Number) parse("{\"diversity\":0.3}").diversity()).doubleValue(), 1e-9);
        assertEquals(1, ((Number) parse("{\"diversity\":1}").diversity()).intValue());
        assertNull(parse("{\"user_id\":\"u1\"}").diversity());
        assertEquals("[ext.fusionrank.diversity] must be a number in [0, 1] or \"auto\", got 1.5",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"diversity\":1.5}")).getMessage());
        assertEquals("[ext.fusionrank.diversity] must be a number in [0, 1] or \"auto\", got high",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"diversity\":\"high\"}")).getMessage());
        assertEquals("[ext.fusionrank.diversity] must be a number in [0, 1] or \"auto\", got -0.1",
            assertThrows(IllegalArgumentException.class, () -> parse("{\"diversity\":-0.1}")).getMessage());
    }
}
