package org.fusionrank.opensearch;

import java.io.IOException;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.opensearch.common.xcontent.XContentFactory;
import org.opensearch.common.xcontent.XContentHelper;
import org.opensearch.common.xcontent.XContentType;
import org.opensearch.core.common.bytes.BytesArray;
import org.opensearch.core.common.bytes.BytesReference;
import org.opensearch.core.xcontent.XContentBuilder;
import org.opensearch.search.SearchHit;

/**
 * The wire format of the service's {@code POST /rerank} (rerank/service/schemas.py {@code RerankRequest} /
 * {@code RerankResponse}), pure functions.
 *
 * <p>Request: {@code {"query": q, "user_id": u (absent for a cold start), "diversity": d (absent: the service's
 * default), "hits": [{"_id": id, "_score": s}, ...]}}
 * in first-stage order. The service reads each product's vectors and fields from its own index by id.
 *
 * <p>Answer: {@code {"hits": {"hits": [{"_id", "_score", "_previous_score", "_explanation"}, ...]},
 * "fusionrank": {"degraded": null|reason, "model_version": v, "unknown_ids": [...]}}}: the same ids in the new order;
 * {@code unknown_ids}: those the service's index does not have (scored from their first-stage score alone).
 */
final class Protocol {

    private Protocol() {}

    /** What a ranked hit of the answer carries. */
    record Ranked(String id, float score, Map<String, Object> explanation) {}

    /** A checked answer: the new order, and the service's own fail-open reason (null when it reranked). */
    record Answer(List<Ranked> order, String serviceDegraded, String modelVersion, List<String> unknownIds) {}

    static final class BadAnswer extends Exception {
        BadAnswer(final String message) {
            super(message);
        }
    }

    static byte[] request(final String query, final String userId, final SearchHit[] hits) throws IOException {
        return request(query, userId, null, hits);
    }

    /** {@code diversity}: a Number or "auto" (checked by {@link FusionrankExt}), or null to leave it to the service. */
    static byte[] request(final String query, final String userId, final Object diversity, final SearchHit[] hits) throws IOException {
        final XContentBuilder b = XContentFactory.jsonBuilder();
        b.startObject();
        b.field("query", query);
        if (userId != null) {
            b.field("user_id", userId);
        }
        if (diversity instanceof Number n) {
            b.field("diversity", n.doubleValue());
        } else if (diversity != null) {
            b.field("diversity", diversity.toString());
        }
        b.startArray("hits");
        for (final SearchHit h : hits) {
            b.startObject().field("_id", h.getId());
            final float s = h.getScore();
            if (Float.isFinite(s)) {
                b.field("_score", s);
            }
            b.endObject();
        }
        b.endArray();
        b.endObject();
        return BytesReference.toBytes(BytesReference.bytes(b));
    }

    @SuppressWarnings("unchecked")
    static Answer parse(final byte[] body, final SearchHit[] sent) throws BadAnswer {
        final Map<String, Object> root;
        try {
            root = XContentHelper.convertToMap(new BytesArray(body), true, XContentType.JSON).v2();
        } catch (final RuntimeException e) {
            throw new BadAnswer("not JSON (" + e.getClass().getSimpleName() + ")");
        }
        if (!(root.get("hits") instanceof Map<?, ?> inner) || !(inner.get("hits") instanceof List<?> list)) {
            throw new BadAnswer("no hits.hits list");
        }
        final Set<String> want = new HashSet<>();
        for (final SearchHit h : sent) {
            want.add(h.getId());
        }
        final Set<String> seen = new HashSet<>();
        final List<Ranked> order = new ArrayList<>(list.size());
        for (int i = 0; i < list.size(); i++) {
            if (!(list.get(i) instanceof Map<?, ?> hit)) {
                throw new BadAnswer("hit " + i + " is not an object");
            }
            if (!(hit.get("_id") instanceof String id) || !want.contains(id)) {
                throw new BadAnswer("hit " + i + " has an _id that was not sent");
            }
            if (!seen.add(id)) {
                throw new BadAnswer("hit " + i + " repeats _id " + id);
            }
            if (!(hit.get("_score") instanceof Number n) || !Double.isFinite(n.doubleValue())) {
                throw new BadAnswer("hit " + id + " has no finite _score");
            }
            final Object ex = hit.get("_explanation");
            order.add(new Ranked(id, n.floatValue(), ex instanceof Map<?, ?> m ? (Map<String, Object>) m : Map.of()));
        }
        if (order.size() != want.size()) {
            throw new BadAnswer(order.size() + " hits back for " + want.size() + " sent");
        }
        String degraded = null;
        String version = null;
        final List<String> unknown = new ArrayList<>();
        if (root.get("fusionrank") instanceof Map<?, ?> fr) {
            degraded = fr.get("degraded") instanceof String d ? d : null;
            version = fr.get("model_version") instanceof String v ? v : null;
            if (fr.get("unknown_ids") instanceof List<?> ids) {
                for (final Object o : ids) {
                    if (o instanceof String s && want.contains(s)) {
                        unknown.add(s);
                    }
                }
            }
        }
        return new Answer(order, degraded, version, unknown);
    }

    /** The explanation a hit carries back: the model's own parts, lists cut to their first 3 items; the
     *  first-stage part is left out (the hit carries its previous score and rank itself). */
    static Map<String, Object> compact(final Map<String, Object> explanation) {
        final Map<String, Object> out = new LinkedHashMap<>();
        for (final Map.Entry<String, Object> e : explanation.entrySet()) {
            if ("first_stage".equals(e.getKey())) {
                continue;
            }
            out.put(e.getKey(), e.getValue() instanceof List<?> l && l.size() > 3 ? l.subList(0, 3) : e.getValue());
        }
        return out;
    }
}
