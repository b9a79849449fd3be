package org.fusionrank.opensearch;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicReference;

import com.sun.net.httpserver.HttpServer;
import org.apache.lucene.search.TotalHits;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.opensearch.action.search.SearchRequest;
import org.opensearch.action.search.SearchResponse;
import org.opensearch.action.search.SearchResponseSections;
import org.opensearch.action.search.ShardSearchFailure;
import org.opensearch.common.xcontent.XContentFactory;
import org.opensearch.common.xcontent.XContentHelper;
import org.opensearch.common.xcontent.XContentType;
import org.opensearch.core.common.bytes.BytesArray;
import org.opensearch.core.common.bytes.BytesReference;
import org.opensearch.core.xcontent.ToXContent;
import org.opensearch.core.xcontent.XContentBuilder;
import org.opensearch.index.query.QueryBuilders;
import org.opensearch.search.SearchHit;
import org.opensearch.search.SearchHits;
import org.opensearch.search.builder.SearchSourceBuilder;

/** The processor against a real HTTP server standing in for the fusionrank service (a JDK HttpServer). */
class FusionrankRerankProcessorTests {

    private static final String KEY = "secret-key-0123456789";
    private HttpServer server;
    private final AtomicReference<Map<String, Object>> lastRequest = new AtomicReference<>();
    private final AtomicReference<String> lastKey = new AtomicReference<>();

    @AfterEach
    void stop() {
        if (server != null) {
            server.stop(0);
        }
    }

    /** A service answering {@code status} with {@code answer} after {@code delayMs}, recording the request. */
    private String serve(final int status, final String answer, final int delayMs) throws IOException {
        server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        server.createContext("/rerank", ex -> {
            lastKey.set(ex.getRequestHeaders().getFirst("X-API-Key"));
            lastRequest.set(XContentHelper.convertToMap(new BytesArray(ex.getRequestBody().readAllBytes()), true, XContentType.JSON).v2());
            try {
                Thread.sleep(delayMs);
            } catch (final InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            final byte[] b = answer.getBytes(StandardCharsets.UTF_8);
            ex.sendResponseHeaders(status, b.length);
            try (OutputStream out = ex.getResponseBody()) {
                out.write(b);
            }
        });
        server.start();
        return "http://127.0.0.1:" + server.getAddress().getPort();
    }

    private static FusionrankRerankProcessor processor(final String url, final Integer budgetMs, final String key) {
        final Map<String, Object> config = new HashMap<>();
        config.put("service_url", url);
        if (budgetMs != null) {
            config.put("budget_ms", budgetMs);
        }
        if (key != null) {
            config.put("api_key", key);
        }
        final FusionrankRerankProcessor p = (FusionrankRerankProcessor) new FusionrankRerankProcessor.Factory().create(Map.of(), "t", null, false, config, null);
        assertTrue(config.isEmpty(), "the factory consumes every key it knows");
        return p;
    }

    /** First stage: a (3.0), b (2.0), c (1.0), each with a _source. */
    private static SearchResponse firstStage() {
        final SearchHit[] hits = new SearchHit[3];
        final String[] ids = {"a", "b", "c"};
        for (int i = 0; i < 3; i++) {
            hits[i] = new SearchHit(i, ids[i], Map.of(), Map.of());
            hits[i].score(3.0f - i);
            hits[i].sourceRef(new BytesArray("{\"title\":\"product " + ids[i] + "\"}"));
        }
        final SearchHits sh = new SearchHits(hits, new TotalHits(3, TotalHits.Relation.EQUAL_TO), 3.0f);
        return new SearchResponse(new SearchResponseSections(sh, null, null, false, null, null, 1), null, 1, 1, 0, 7,
            ShardSearchFailure.EMPTY_ARRAY, SearchResponse.Clusters.EMPTY);
    }

    private static SearchRequest request(final String userId, final String queryText) {
        final SearchSourceBuilder src = new SearchSourceBuilder().query(QueryBuilders.matchQuery("title", "black running shoes"));
        final Map<String, Object> ext = new HashMap<>();
        if (userId != null) {
            ext.put("user_id", userId);
        }
        if (queryText != null) {
            ext.put("query_text", queryText);
        }
        if (!ext.isEmpty()) {
            src.ext(List.of(new FusionrankExt(ext)));
        }
        return new SearchRequest("products").source(src);
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> rendered(final SearchResponse r) throws IOException {
        final XContentBuilder b = XContentFactory.jsonBuilder();
        r.toXContent(b, ToXContent.EMPTY_PARAMS);
        return XContentHelper.convertToMap(BytesReference.bytes(b), true, XContentType.JSON).v2();
    }

    @SuppressWarnings("unchecked")
    private static List<Map<String, Object>> hits(final Map<String, Object> rendered) {
        return (List<Map<String, Object>>) ((Map<String, Object>) rendered.get("hits")).get("hits");
    }

    private static List<String> ids(final Map<String, Object> rendered) {
        final List<String> out = new ArrayList<>();
        for (final Map<String, Object> h : hits(rendered)) {
            out.add((String) h.get("_id"));
        }
        return out;
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> status(final Map<String, Object> rendered) {
        return (Map<String, Object>) ((Map<String, Object>) rendered.get("ext")).get("fusionrank");
    }

    private static final String ANSWER = "{\"hits\":{\"hits\":["
        + "{\"_id\":\"c\",\"_score\":0.9,\"_previous_score\":1.0,\"_explanation\":{\"gates\":{\"text\":0.7,\"image\":0.3},"
        + "\"history_top\":[1,2,3,4,5],\"first_stage\":{\"bm25\":1.0}}},"
        + "{\"_id\":\"a\",\"_score\":0.5,\"_explanation\":{}},{\"_id\":\"b\",\"_score\":-0.25}],\"max_score\":0.9},"
        + "\"fusionrank\":{\"degraded\":null,\"model_version\":\"m-1\",\"unknown_ids\":[\"b\",\"zz\"]}}";

    @Test
    @SuppressWarnings("unchecked")
    void reordersByTheServiceAndSendsQueryUserIdsAndScores() throws Exception {
        final String url = serve(200, ANSWER, 0);
        final Map<String, Object> out = rendered(processor(url, 2000, KEY).processResponse(request("u1", null), firstStage()));

        assertEquals(List.of("c", "a", "b"), ids(out));
        final List<Map<String, Object>> hs = hits(out);
        assertEquals(0.9, ((Number) hs.get(0).get("_score")).doubleValue(), 1e-6);
        assertEquals(-0.25, ((Number) hs.get(2).get("_score")).doubleValue(), 1e-6);
        assertEquals(0.9, ((Number) ((Map<String, Object>) out.get("hits")).get("max_score")).doubleValue(), 1e-6);
        assertEquals(Map.of("title", "product c"), hs.get(0).get("_source"), "the hit keeps its _source");
        final Map<String, Object> info = ((List<Map<String, Object>>) ((Map<String, Object>) hs.get(0).get("fields")).get("fusionrank")).get(0);
        assertEquals(1.0, ((Number) info.get("previous_score")).doubleValue(), 1e-6);
        assertEquals(3, info.get("previous_rank"));
        assertEquals(false, info.get("unknown"));
        final Map<String, Object> infoB = ((List<Map<String, Object>>) ((Map<String, Object>) hs.get(2).get("fields")).get("fusionrank")).get(0);
        assertEquals(true, infoB.get("unknown"), "b is flagged as unknown to the service");
        final Map<String, Object> ex = (Map<String, Object>) info.get("explanation");
        assertEquals(List.of(1, 2, 3), ex.get("history_top"), "lists are cut to 3");
        assertFalse(ex.containsKey("first_stage"));
        final Map<String, Object> st = status(out);
        assertEquals(true, st.get("reranked"));
        assertNull(st.get("degraded"));
        assertEquals("m-1", st.get("model_version"));
        assertEquals(List.of("b"), st.get("unknown_ids"), "only ids that were sent");

        final Map<String, Object> sent = lastRequest.get();
        assertEquals("black running shoes", sent.get("query"), "the query text is taken from the match query");
        assertEquals("u1", sent.get("user_id"));
        assertEquals(List.of(Map.of("_id", "a", "_score", 3.0), Map.of("_id", "b", "_score", 2.0), Map.of("_id", "c", "_score", 1.0)),
            sent.get("hits"));
        assertEquals(KEY, lastKey.get());
    }

    @Test
    void noUserIdIsAColdStartAndQueryTextFromExtWins() throws Exception {
        final String url = serve(200, ANSWER, 0);
        final Map<String, Object> out = rendered(processor(url, 2000, null).processResponse(request(null, "red dress"), firstStage()));
        assertEquals(List.of("c", "a", "b"), ids(out));
        assertFalse(lastRequest.get().containsKey("user_id"));
        assertEquals("red dress", lastRequest.get().get("query"));
        assertFalse(lastRequest.get().containsKey("diversity"), "no diversity: the service's default");
        assertNull(lastKey.get());
    }

    @Test
    void theDiversityIsForwarded() throws Exception {
        final String url = serve(200, ANSWER, 0);
        for (final Object d : List.of("auto", 0.3)) {
            final SearchSourceBuilder src = new SearchSourceBuilder().query(QueryBuilders.matchQuery("title", "heels"))
                .ext(List.of(new FusionrankExt(Map.of("diversity", d))));
            processor(url, 2000, null).processResponse(new SearchRequest("products").source(src), firstStage());
            assertEquals(d, lastRequest.get().get("diversity"));
        }
    }

    private void assertFirstStage(final Map<String, Object> out, final String reasonStart) {
        assertEquals(List.of("a", "b", "c"), ids(out));
        assertEquals(3.0, ((Number) hits(out).get(0).get("_score")).doubleValue(), 1e-6);
        assertEquals(Map.of("title", "product a"), hits(out).get(0).get("_source"));
        final Map<String, Object> st = status(out);
        assertEquals(false, st.get("reranked"));
        assertEquals(List.of(), st.get("unknown_ids"));
        final String reason = (String) st.get("degraded");
        assertTrue(reason != null && reason.startsWith(reasonStart), "reason: " + reason);
        assertFalse(reason.contains(KEY), "the key is never shown");
    }

    @Test
    void aServiceDownKeepsTheFirstStageOrder() throws Exception {
        final int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        assertFirstStage(rendered(processor("http://127.0.0.1:" + port, 200, KEY).processResponse(request("u1", null), firstStage())),
            "service unreachable");
    }

    @Test
    void aSlowServiceFailsOpenWithinTheBudget() throws Exception {
        final String url = serve(200, ANSWER, 500);
        final FusionrankRerankProcessor p = processor(url, null, KEY);
        assertEquals(50, p.budgetMs(), "default budget");
        final long t0 = System.nanoTime();
        final Map<String, Object> out = rendered(p.processResponse(request("u1", null), firstStage()));
        final double ms = (System.nanoTime() - t0) / 1e6;
        assertFirstStage(out, "timeout");
        assertTrue(ms < 400, "returned after " + ms + " ms, not after the service's 500 ms");
    }

    @Test
    void aWrongKeyFailsOpenWithAReasonAndWithoutTheKey() throws Exception {
        final String url = serve(401, "{\"detail\":\"invalid API key (X-API-Key or Authorization: Bearer)\"}", 0);
        assertFirstStage(rendered(processor(url, 2000, KEY).processResponse(request("u1", null), firstStage())),
            "the service refused the pipeline's API key (HTTP 401)");
    }

    @Test
    void anErrorStatusFailsOpen() throws Exception {
        final String url = serve(503, "{\"detail\":\"model not loaded\"}", 0);
        assertFirstStage(rendered(processor(url, 2000, KEY).processResponse(request("u1", null), firstStage())),
            "service answered HTTP 503: {\"detail\":\"model not loaded\"}");
    }

    @Test
    void badAnswersFailOpen() throws Exception {
        final String[][] cases = {
            {"not json", "bad answer from the service: not JSON"},
            {"{\"hits\":{\"hits\":[{\"_id\":\"a\",\"_score\":1},{\"_id\":\"b\",\"_score\":1}]}}", "bad answer from the service: 2 hits back for 3 sent"},
            {"{\"hits\":{\"hits\":[{\"_id\":\"a\",\"_score\":1},{\"_id\":\"a\",\"_score\":1},{\"_id\":\"c\",\"_score\":1}]}}", "bad answer from the service: hit 1 repeats _id a"},
            {"{\"hits\":{\"hits\":[{\"_id\":\"x\",\"_score\":1}]}}", "bad answer from the service: hit 0 has an _id that was not sent"},
            {"{\"hits\":{\"hits\":[{\"_id\":\"a\",\"_score\":\"high\"}]}}", "bad answer from the service: hit a has no finite _score"},
            {"{\"results\":[]}", "bad answer from the service: no hits.hits list"},
        };
        for (final String[] c : cases) {
            final String url = serve(200, c[0], 0);
            assertFirstStage(rendered(processor(url, 2000, KEY).processResponse(request("u1", null), firstStage())), c[1]);
            stop();
        }
        server = null;
    }

    @Test
    void theServicesOwnFailOpenIsReported() throws Exception {
        final String url = serve(200, "{\"hits\":{\"hits\":[{\"_id\":\"a\",\"_score\":3},{\"_id\":\"b\",\"_score\":2},{\"_id\":\"c\",\"_score\":1}]},"
            + "\"fusionrank\":{\"degraded\":\"timeout\",\"model_version\":\"m-1\"}}", 0);
        assertFirstStage(rendered(processor(url, 2000, KEY).processResponse(request("u1", null), firstStage())), "service: timeout");
    }

    @Test
    void aQueryWithoutTextFailsOpenAndSaysWhatToSend() throws Exception {
        final String url = serve(200, ANSWER, 0);
        final SearchRequest r = new SearchRequest("products").source(new SearchSourceBuilder().query(QueryBuilders.matchAllQuery()));
        assertFirstStage(rendered(processor(url, 2000, KEY).processResponse(r, firstStage())),
            "no query text: the query has none; send ext.fusionrank.query_text");
        assertNull(lastRequest.get(), "the service was not called");
    }

    @Test
    void noHitsNoCall() throws Exception {
        final String url = serve(200, ANSWER, 0);
        final SearchHits empty = new SearchHits(new SearchHit[0], new TotalHits(0, TotalHits.Relation.EQUAL_TO), Float.NaN);
        final SearchResponse r = new SearchResponse(new SearchResponseSections(empty, null, null, false, null, null, 1), null, 1, 1, 0, 7,
            ShardSearchFailure.EMPTY_ARRAY, SearchResponse.Clusters.EMPTY);
        final Map<String, Object> out = rendered(processor(url, 2000, KEY).processResponse(request("u1", null), r));
        assertEquals(List.of(), ids(out));
        assertNull(status(out).get("degraded"));
        assertNull(lastRequest.get());
    }

    @Test
    void badConfigurationIsRefusedWithTheReason() {
        final FusionrankRerankProcessor.Factory f = new FusionrankRerankProcessor.Factory();
        final Map<String, Object> none = new HashMap<>();
        assertTrue(assertThrows(IllegalArgumentException.class, () -> f.create(Map.of(), "t", null, false, none, null))
            .getMessage().contains("service_url is required"));
        final Map<String, Object> ftp = new HashMap<>(Map.of("service_url", "ftp://x"));
        assertTrue(assertThrows(IllegalArgumentException.class, () -> f.create(Map.of(), "t", null, false, ftp, null))
            .getMessage().contains("service_url is required"));
        for (final Object bad : new Object[] {0, 60_001, "50", 1.5}) {
            final Map<String, Object> c = new HashMap<>(Map.of("service_url", "http://127.0.0.1:1", "budget_ms", bad));
            assertTrue(assertThrows(IllegalArgumentException.class, () -> f.create(Map.of(), "t", null, false, c, null))
                .getMessage().contains("budget_ms must be an integer from 1 to 60000"), "budget " + bad);
        }
        final Map<String, Object> key = new HashMap<>(Map.of("service_url", "http://127.0.0.1:1", "api_key", ""));
        assertTrue(assertThrows(IllegalArgumentException.class, () -> f.create(Map.of(), "t", null, false, key, null))
            .getMessage().contains("api_key must be a non-empty string"));
    }

    @Test
    void theClientNeverShowsTheKey() {
        final ServiceClient.Http c = new ServiceClient.Http("http://127.0.0.1:8000/", KEY);
        assertEquals("http://127.0.0.1:8000/rerank", c.url().toString());
        assertFalse(c.toString().contains(KEY));
    }
}
