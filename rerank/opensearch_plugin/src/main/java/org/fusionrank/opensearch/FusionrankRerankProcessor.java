package org.fusionrank.opensearch;

import java.io.IOException;
import java.net.ConnectException;
import java.net.SocketTimeoutException;
import java.net.UnknownHostException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.Logger;
import org.opensearch.action.search.SearchRequest;
import org.opensearch.action.search.SearchResponse;
import org.opensearch.action.search.SearchResponseSections;
import org.opensearch.common.document.DocumentField;
import org.opensearch.search.SearchExtBuilder;
import org.opensearch.search.SearchHit;
import org.opensearch.search.SearchHits;
import org.opensearch.search.profile.SearchProfileShardResults;
import org.opensearch.search.pipeline.AbstractProcessor;
import org.opensearch.search.pipeline.Processor;
import org.opensearch.search.pipeline.SearchResponseProcessor;

/**
 * {@code fusionrank_rerank}: sends the query, the shopper ({@code ext.fusionrank.user_id}) and every hit's id
 * and first-stage score to the fusionrank service's {@code POST /rerank}, and returns the hits in the service's
 * order with its scores. Each hit keeps its {@code _source} and gains {@code fields.fusionrank}:
 * {@code [{"previous_score", "previous_rank", "explanation"}]}; {@code hits.max_score} is the best new score.
 *
 * <p>Fail open, never fail the search: the whole call has a budget ({@code budget_ms}, default 50); past it,
 * or when the service is down, refuses the key, answers an error or an answer that is not the same hits, the
 * hits keep their first-stage order and scores. Either way the response carries {@code ext.fusionrank}:
 * {@code {"reranked": bool, "degraded": null|reason, "took_ms": n, "model_version": v, "unknown_ids": [...]}}
 * ({@code unknown_ids}: hits the service's index does not have, scored from their first-stage score alone; each
 * such hit's {@code fields.fusionrank[0].unknown} is true).
 *
 * <p>Configuration: {@code service_url} (required, http or https), {@code api_key} (optional; sent as
 * {@code X-API-Key}, never logged nor shown), {@code budget_ms} (1..60000, default 50).
 */
public final class FusionrankRerankProcessor extends AbstractProcessor implements SearchResponseProcessor {

    public static final String TYPE = "fusionrank_rerank";
    public static final int DEFAULT_BUDGET_MS = 50;
    static final String HIT_FIELD = "fusionrank";
    private static final Logger LOG = LogManager.getLogger(FusionrankRerankProcessor.class);

    private final ServiceClient client;
    private final int budgetMs;

    FusionrankRerankProcessor(final String tag, final String description, final boolean ignoreFailure,
                              final ServiceClient client, final int budgetMs) {
        super(tag, description, ignoreFailure);
        this.client = client;
        this.budgetMs = budgetMs;
    }

    @Override
    public String getType() {
        return TYPE;
    }

    int budgetMs() {
        return budgetMs;
    }

    ServiceClient client() {
        return client;
    }

    @Override
    public SearchResponse processResponse(final SearchRequest request, final SearchResponse response) throws Exception {
        final long t0 = System.nanoTime();
        final SearchHit[] hits = response.getHits().getHits();
        final Map<String, Object> status = new LinkedHashMap<>();
        String degraded = null;
        Protocol.Answer answer = null;
        if (hits.length > 0) {
            try {
                answer = call(request, hits, t0);
                degraded = answer.serviceDegraded() == null ? null : "service: " + answer.serviceDegraded();
            } catch (final FailOpen e) {
                degraded = e.getMessage();
            } catch (final Exception e) { // never fail the search
                degraded = "error: " + e.getClass().getSimpleName();
                LOG.warn("fusionrank_rerank [{}] failed", getTag(), e);
            }
        }
        if (degraded != null) {
            LOG.warn("fusionrank_rerank [{}]: first-stage order kept ({})", getTag(), degraded);
        }
        status.put("reranked", answer != null && answer.serviceDegraded() == null);
        status.put("degraded", degraded);
        status.put("took_ms", Math.round((System.nanoTime() - t0) / 1e5) / 10.0);
        status.put("model_version", answer == null ? null : answer.modelVersion());
        status.put("unknown_ids", answer == null ? List.of() : answer.unknownIds());
        return rebuilt(response, answer == null ? null : apply(hits, answer), new FusionrankExt(status));
    }

    /** Why the first-stage order was kept (its message goes into the response: no secrets in it). */
    static final class FailOpen extends Exception {
        FailOpen(final String message) {
            super(message);
        }
    }

    private Protocol.Answer call(final SearchRequest request, final SearchHit[] hits, final long t0) throws Exception {
        FusionrankExt ext = null;
        if (request.source() != null && request.source().ext() != null) {
            for (final SearchExtBuilder b : request.source().ext()) {
                if (b instanceof FusionrankExt f) {
                    ext = f;
                }
            }
        }
        String query = ext == null ? null : ext.queryText();
        if (query == null) {
            query = QueryText.of(request.source() == null ? null : request.source().query());
        }
        if (query == null) {
            throw new FailOpen("no query text: the query has none; send ext.fusionrank.query_text");
        }
        final byte[] body = Protocol.request(query, ext == null ? null : ext.userId(), ext == null ? null : ext.diversity(), hits);
        final ServiceClient.Reply reply;
        try {
            reply = client.post(body, budgetMs);
        } catch (final SocketTimeoutException e) {
            throw new FailOpen("timeout: no answer within the " + budgetMs + " ms budget");
        } catch (final ConnectException | UnknownHostException e) {
            throw new FailOpen("service unreachable (" + e.getClass().getSimpleName() + ")");
        } catch (final IOException e) {
            throw new FailOpen("service call failed (" + e.getClass().getSimpleName() + ")");
        }
        final double spentMs = (System.nanoTime() - t0) / 1e6;
        if (spentMs > budgetMs) {
            throw new FailOpen(String.format(java.util.Locale.ROOT, "timeout: answer after %.1f ms, budget %d ms", spentMs, budgetMs));
        }
        if (reply.status() == 401 || reply.status() == 403) {
            throw new FailOpen("the service refused the pipeline's API key (HTTP " + reply.status() + "): check the processor's api_key");
        }
        if (reply.status() != 200) {
            throw new FailOpen("service answered HTTP " + reply.status() + ": " + ServiceClient.text(reply.body(), 200));
        }
        try {
            return Protocol.parse(reply.body(), hits);
        } catch (final Protocol.BadAnswer e) {
            throw new FailOpen("bad answer from the service: " + e.getMessage());
        }
    }

    private static SearchHit[] apply(final SearchHit[] hits, final Protocol.Answer answer) {
        final Map<String, Integer> rank = new HashMap<>();
        for (int i = 0; i < hits.length; i++) {
            rank.put(hits[i].getId(), i);
        }
        final java.util.Set<String> unknown = new java.util.HashSet<>(answer.unknownIds());
        final SearchHit[] out = new SearchHit[hits.length];
        int r = 0;
        for (final Protocol.Ranked ranked : answer.order()) {
            final int i = rank.get(ranked.id());
            final SearchHit h = hits[i];
            final Map<String, Object> info = new LinkedHashMap<>();
            info.put("previous_score", h.getScore());
            info.put("previous_rank", i + 1);
            info.put("unknown", unknown.contains(ranked.id()));
            info.put("explanation", Protocol.compact(ranked.explanation()));
            h.score(ranked.score());
            h.setDocumentField(HIT_FIELD, new DocumentField(HIT_FIELD, List.of(info)));
            out[r++] = h;
        }
        return out;
    }

    private static SearchResponse rebuilt(final SearchResponse response, final SearchHit[] reordered, final FusionrankExt ext) {
        final SearchHits old = response.getHits();
        SearchHits hits = old;
        if (reordered != null) {
            float max = Float.NEGATIVE_INFINITY;
            for (final SearchHit h : reordered) {
                max = Math.max(max, h.getScore());
            }
            hits = new SearchHits(reordered, old.getTotalHits(), reordered.length == 0 ? Float.NaN : max, old.getSortFields(),
                old.getCollapseField(), old.getCollapseValues());
        }
        final SearchResponseSections in = response.getInternalResponse();
        final List<SearchExtBuilder> exts = new ArrayList<>(in.getSearchExtBuilders());
        exts.add(ext);
        final Map<String, org.opensearch.search.profile.ProfileShardResult> profile = response.getProfileResults();
        final SearchResponseSections sections = new SearchResponseSections(hits, response.getAggregations(), response.getSuggest(),
            response.isTimedOut(), response.isTerminatedEarly(), profile == null || profile.isEmpty() ? null : new SearchProfileShardResults(profile),
            response.getNumReducePhases(), exts, in.getProcessorResult());
        return new SearchResponse(sections, response.getScrollId(), response.getTotalShards(), response.getSuccessfulShards(),
            response.getSkippedShards(), response.getTook().millis(), response.getPhaseTook(), response.getShardFailures(),
            response.getClusters(), response.pointInTimeId());
    }

    /** Reads and checks the processor's configuration (unknown keys are refused by the pipeline service). */
    public static final class Factory implements Processor.Factory<SearchResponseProcessor> {
        @Override
        public SearchResponseProcessor create(final Map<String, Processor.Factory<SearchResponseProcessor>> factories, final String tag,
                                              final String description, final boolean ignoreFailure, final Map<String, Object> config,
                                              final PipelineContext context) {
            final Object url = config.remove("service_url");
            if (!(url instanceof String u) || !(u.startsWith("http://") || u.startsWith("https://"))) {
                throw new IllegalArgumentException("[" + TYPE + "] service_url is required: the fusionrank service's base URL, "
                    + "http://host:port or https://host:port (got " + (url == null ? "nothing" : "a value that is not an http(s) URL") + ")");
            }
            final Object key = config.remove("api_key");
            if (key != null && (!(key instanceof String k) || k.isEmpty())) {
                throw new IllegalArgumentException("[" + TYPE + "] api_key must be a non-empty string");
            }
            final Object budget = config.remove("budget_ms");
            int budgetMs = DEFAULT_BUDGET_MS;
            if (budget != null) {
                if (!(budget instanceof Integer b) || b < 1 || b > 60_000) {
                    throw new IllegalArgumentException("[" + TYPE + "] budget_ms must be an integer from 1 to 60000, got " + budget);
                }
                budgetMs = b;
            }
            final ServiceClient client;
            try {
                client = new ServiceClient.Http(u, (String) key);
            } catch (final IllegalArgumentException e) {
                throw new IllegalArgumentException("[" + TYPE + "] service_url is not a valid URL");
            }
            return new FusionrankRerankProcessor(tag, description, ignoreFailure, client, budgetMs);
        }
    }
}
