package org.fusionrank.opensearch;

import java.util.List;
import java.util.Map;

import org.opensearch.plugins.Plugin;
import org.opensearch.plugins.SearchPipelinePlugin;
import org.opensearch.plugins.SearchPlugin;
import org.opensearch.search.pipeline.Processor;
import org.opensearch.search.pipeline.SearchResponseProcessor;

/**
 * fusionrank for OpenSearch: the {@code fusionrank_rerank} search response processor and the
 * {@code ext.fusionrank} request section that names the shopper.
 */
public class FusionrankPlugin extends Plugin implements SearchPipelinePlugin, SearchPlugin {

    @Override
    public Map<String, Processor.Factory<SearchResponseProcessor>> getResponseProcessors(final Parameters parameters) {
        return Map.of(FusionrankRerankProcessor.TYPE, new FusionrankRerankProcessor.Factory());
    }

    @Override
    public List<SearchExtSpec<?>> getSearchExts() {
        return List.of(new SearchExtSpec<>(FusionrankExt.NAME, FusionrankExt::new, FusionrankExt::parse));
    }
}
