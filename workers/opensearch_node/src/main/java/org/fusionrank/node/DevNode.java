package org.fusionrank.node;

import java.io.IOException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import org.codelibs.opensearch.runner.OpenSearchRunner;

/**
 * One single-node OpenSearch 2.19.1 cluster for fusionrank's tests and `fusionrank opensearch dev-node`.
 *
 * <p>codelibs' OpenSearchRunner starts the node (core modules and the plugins named by --plugins, all
 * loaded from the classpath, so _cat/plugins names them by class). This class only adds what the runner's
 * command line cannot say: the exact HTTP and transport ports, the bind address and any other node setting
 * (--setting key=value). It prints one line "fusionrank-node started http://host:port" once the node is
 * started, and stops the node when it gets SIGTERM/SIGINT or when its standard input closes
 * (--stop-on-stdin-eof: the test fixture's parent process died).
 *
 * <p>Usage: DevNode --home DIR --http-port N --transport-port N [--host 127.0.0.1] [--plugins a,b]
 * [--setting key=value]... [--stop-on-stdin-eof]
 */
public final class DevNode {

    private DevNode() {}

    public static void main(final String[] args) throws Exception {
        String home = null;
        String host = "127.0.0.1";
        String plugins = "";
        int httpPort = -1;
        int transportPort = -1;
        boolean stopOnEof = false;
        final Map<String, String> extra = new LinkedHashMap<>();
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--home" -> home = args[++i];
                case "--host" -> host = args[++i];
                case "--plugins" -> plugins = args[++i];
                case "--http-port" -> httpPort = Integer.parseInt(args[++i]);
                case "--transport-port" -> transportPort = Integer.parseInt(args[++i]);
                case "--stop-on-stdin-eof" -> stopOnEof = true;
                case "--setting" -> {
                    final String kv = args[++i];
                    final int eq = kv.indexOf('=');
                    if (eq <= 0) {
                        throw new IllegalArgumentException("--setting wants key=value, got " + kv);
                    }
                    extra.put(kv.substring(0, eq), kv.substring(eq + 1));
                }
                default -> throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        if (home == null || httpPort <= 0 || transportPort <= 0) {
            throw new IllegalArgumentException("--home, --http-port and --transport-port are required");
        }
        final String bindHost = host;
        final String http = Integer.toString(httpPort);
        final String transport = Integer.toString(transportPort);

        final OpenSearchRunner runner = new OpenSearchRunner();
        final CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                runner.close();
            } catch (final IOException e) {
                System.err.println("fusionrank-node: closing failed: " + e);
            }
            stopped.countDown();
        }, "fusionrank-node-shutdown"));

        runner.onBuild((index, settings) -> {
            settings.put("network.host", bindHost);
            settings.put("http.port", http);
            settings.put("transport.port", transport);
            settings.put("discovery.type", "single-node");
            settings.put("cluster.routing.allocation.disk.threshold_enabled", "false");
            settings.put("action.auto_create_index", "true");
            extra.forEach(settings::put);
        });
        runner.build(OpenSearchRunner.newConfigs()
                .basePath(home)
                .numOfNode(1)
                .clusterName("fusionrank-dev")
                .pluginTypes(plugins)
                .printOnFailure());
        System.out.println("fusionrank-node started http://" + bindHost + ":" + http);
        System.out.flush();

        if (stopOnEof) {
            final Thread watcher = new Thread(() -> {
                try {
                    while (System.in.read() >= 0) {
                        // keep reading until the parent closes the pipe
                    }
                } catch (final IOException e) {
                    // the pipe broke: treat it like EOF
                }
                System.exit(0);
            }, "fusionrank-node-stdin");
            watcher.setDaemon(true);
            watcher.start();
        }
        stopped.await();
    }
}
