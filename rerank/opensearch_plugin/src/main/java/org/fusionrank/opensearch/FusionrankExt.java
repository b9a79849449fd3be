package org.fusionrank.opensearch;

import java.io.IOException;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Objects;
import java.util.Set;

import org.opensearch.core.common.io.stream.StreamInput;
import org.opensearch.core.common.io.stream.StreamOutput;
import org.opensearch.core.xcontent.XContentBuilder;
import org.opensearch.core.xcontent.XContentParser;
import org.opensearch.search.SearchExtBuilder;

/**
 * The {@code ext.fusionrank} section, both ways.
 *
 * <p>In a search request it names the shopper and, optionally, the query text:
 * {@code "ext": {"fusionrank": {"user_id": "u1", "query_text": "black running shoes", "diversity": "auto"}}}. All are
 * optional: no user id is a cold start; without {@code query_text} the processor takes the first query text of the
 * search's own query ({@link QueryText}); without {@code diversity} (a number in [0, 1] or {@code "auto"}: the
 * rerank call's diversity step) the service's default for the index applies. Any other key, a user id or query text
 * that is not a non-empty string, or a diversity outside its range is refused with the key's name.
 *
 * <p>In the response the processor adds one with what it did: {@code reranked} (true/false), {@code degraded}
 * (null, or why the first-stage order was kept), {@code took_ms} and the service's {@code model_version}.
 */
public final class FusionrankExt extends SearchExtBuilder {

    public static final String NAME = "fusionrank";
    public static final String USER_ID = "user_id";
    public static final String QUERY_TEXT = "query_text";
    public static final String DIVERSITY = "diversity";
    static final Set<String> REQUEST_KEYS = Set.of(USER_ID, QUERY_TEXT, DIVERSITY);
    static final int MAX_VALUE_CHARS = 4096;

    private final Map<String, Object> values;

    public FusionrankExt(final Map<String, Object> values) {
        this.values = Collections.unmodifiableMap(new LinkedHashMap<>(values));
    }

    public FusionrankExt(final StreamInput in) throws IOException {
        this(in.readMap());
    }

    /** Parses the request section (the parser is on its START_OBJECT). */
    public static FusionrankExt parse(final XContentParser parser) throws IOException {
        final Map<String, Object> raw = parser.map();
        for (final Map.Entry<String, Object> e : raw.entrySet()) {
            if (!REQUEST_KEYS.contains(e.getKey())) {
                throw new IllegalArgumentException("[ext.fusionrank] unknown key [" + e.getKey() + "]; valid: "
                    + DIVERSITY + ", " + QUERY_TEXT + ", " + USER_ID);
            }
            if (DIVERSITY.equals(e.getKey())) {
                checkDiversity(e.getValue());
                continue;
            }
            if (!(e.getValue() instanceof String s) || s.isBlank()) {
                throw new IllegalArgumentException("[ext.fusionrank." + e.getKey() + "] must be a non-empty string, got "
                    + (e.getValue() == null ? "null" : e.getValue().getClass().getSimpleName()));
            }
            if (s.length() > MAX_VALUE_CHARS) {
                throw new IllegalArgumentException("[ext.fusionrank." + e.getKey() + "] is longer than " + MAX_VALUE_CHARS + " characters");
            }
        }
        return new FusionrankExt(raw);
    }

    /** A diversity is a finite number in [0, 1] or the string "auto" (what the service's /rerank accepts). */
    static void checkDiversity(final Object v) {
        final boolean ok = ("auto".equals(v))
            || (v instanceof Number n && !(v instanceof Float f && f.isNaN()) && Double.isFinite(n.doubleValue())
                && n.doubleValue() >= 0.0 && n.doubleValue() <= 1.0);
        if (!ok) {
            throw new IllegalArgumentException("[ext.fusionrank." + DIVERSITY + "] must be a number in [0, 1] or \"auto\", got "
                + (v == null ? "null" : v instanceof String || v instanceof Number ? v : v.getClass().getSimpleName()));
        }
    }

    /** The call's diversity: a Number in [0, 1], "auto", or null (the service's default). */
    public Object diversity() {
        return values.get(DIVERSITY);
    }

    public Map<String, Object> values() {
        return values;
    }

    public String userId() {
        return (String) values.get(USER_ID);
    }

    public String queryText() {
        return (String) values.get(QUERY_TEXT);
    }

    @Override
    public String getWriteableName() {
        return NAME;
    }

    @Override
    public void writeTo(final StreamOutput out) throws IOException {
        out.writeMap(values);
    }

    @Override
    public XContentBuilder toXContent(final XContentBuilder builder, final Params params) throws IOException {
        return builder.field(NAME, values);
    }

    @Override
    public int hashCode() {
        return Objects.hash(getClass(), values);
    }

    @Override
    public boolean equals(final Object obj) {
        return obj instanceof FusionrankExt other && values.equals(other.values);
    }
}
