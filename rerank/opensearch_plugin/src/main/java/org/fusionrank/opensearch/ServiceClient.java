package org.fusionrank.opensearch;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.URI;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.security.AccessController;
import java.security.PrivilegedActionException;
import java.security.PrivilegedExceptionAction;

/** One POST of a JSON body to the fusionrank service's {@code /rerank}, within a time limit. */
interface ServiceClient {

    /** The HTTP status and body of the answer. Throws {@link java.net.SocketTimeoutException} past the limit. */
    Reply post(byte[] body, int timeoutMs) throws IOException;

    record Reply(int status, byte[] body) {}

    /** Largest answer read (100 hits with explanations is ~50 KB). */
    int MAX_ANSWER_BYTES = 8 << 20;

    /**
     * {@link HttpURLConnection} (the JDK's keep-alive pool reuses connections between searches), run in
     * {@code AccessController.doPrivileged} so that it works under the security manager with the plugin's
     * {@code SocketPermission}. The key goes in {@code X-API-Key}; it is never logged.
     */
    final class Http implements ServiceClient {
        private final URL url;
        private final String apiKey;

        Http(final String serviceUrl, final String apiKey) {
            try {
                this.url = URI.create(serviceUrl.replaceAll("/+$", "") + "/rerank").toURL();
            } catch (final IllegalArgumentException | java.net.MalformedURLException e) {
                throw new IllegalArgumentException("not a URL: " + serviceUrl, e);
            }
            this.apiKey = apiKey;
        }

        URL url() {
            return url;
        }

        @Override
        public Reply post(final byte[] body, final int timeoutMs) throws IOException {
            try {
                return AccessController.doPrivileged((PrivilegedExceptionAction<Reply>) () -> send(body, timeoutMs));
            } catch (final PrivilegedActionException e) {
                throw (IOException) e.getException();
            }
        }

        private Reply send(final byte[] body, final int timeoutMs) throws IOException {
            final long t0 = System.nanoTime();
            final HttpURLConnection c = (HttpURLConnection) url.openConnection();
            c.setConnectTimeout(Math.max(1, timeoutMs));
            c.setReadTimeout(Math.max(1, timeoutMs)); // applied to the socket by connect()
            c.setRequestMethod("POST");
            c.setDoOutput(true);
            c.setUseCaches(false);
            c.setFixedLengthStreamingMode(body.length);
            c.setRequestProperty("Content-Type", "application/json");
            c.setRequestProperty("Accept", "application/json");
            if (apiKey != null) {
                c.setRequestProperty("X-API-Key", apiKey);
            }
            c.connect(); // a pooled keep-alive connection: immediate
            // a read timeout is per read and the socket's is set by connect(): a new connection can take up to the
            // budget to connect and the budget again to answer; the processor discards an answer past the budget
            if ((System.nanoTime() - t0) / 1_000_000L >= timeoutMs) {
                c.disconnect();
                throw new java.net.SocketTimeoutException("connecting took the whole budget");
            }
            try (OutputStream out = c.getOutputStream()) {
                out.write(body);
            }
            final int status = c.getResponseCode();
            final InputStream in = status >= 400 ? c.getErrorStream() : c.getInputStream();
            if (in == null) {
                return new Reply(status, new byte[0]);
            }
            try (in) {
                final ByteArrayOutputStream buf = new ByteArrayOutputStream(16 * 1024);
                final byte[] chunk = new byte[16 * 1024];
                int n;
                while ((n = in.read(chunk)) >= 0) {
                    buf.write(chunk, 0, n);
                    if (buf.size() > MAX_ANSWER_BYTES) {
                        throw new IOException("answer larger than " + MAX_ANSWER_BYTES + " bytes");
                    }
                }
                return new Reply(status, buf.toByteArray());
            }
        }

        @Override
        public String toString() {
            return "POST " + url + (apiKey != null ? " (with an API key)" : "");
        }
    }

    static String text(final byte[] body, final int max) {
        final String s = new String(body, StandardCharsets.UTF_8);
        return s.length() > max ? s.substring(0, max) + "..." : s;
    }
}
