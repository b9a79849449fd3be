"""``fusionrank demo``: the main job on the embedded default, end to end, saying what it did."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

DEMO_SYSTEMS = ("random", "bm25", "knn_text", "hybrid_minmax", "hybrid_rrf", "lambdamart", "fusion")
EXAMPLE_QUERIES = ("black casual shoes for men", "women's red handbag")


def demo_data(settings, *, synthetic: bool, synthetic_size: int):
    """``(DatasetSpec, synthetic)``: the fashion benchmark from the shared data folder, or a catalog generated in the data dir."""
    from rerank.training.ranker import DatasetSpec

    fashion = settings.fashion_dir
    if fashion is not None and not synthetic:
        bench = fashion / "bench"
        spec = DatasetSpec(catalog=bench / "catalog.csv", queries=bench / "dev" / "queries.tsv", qrels=bench / "dev" / "qrels.tsv",
                           gain="identity", events=bench / "dev" / "events.csv", images_root=fashion, name="fashion/bench/dev")
        return spec, False
    from indexing.synthetic import make_synthetic_catalog, make_synthetic_queries

    out = settings.data_dir / f"synthetic-{synthetic_size}"
    catalog = out / "catalog.csv"
    if not catalog.is_file():
        make_synthetic_catalog(out, n=synthetic_size, seed=0)
    queries, qrels = make_synthetic_queries(out)
    return DatasetSpec(catalog=catalog, queries=queries, qrels=qrels, gain="identity", images_root=out, name="synthetic"), True


def install_for_serving(settings, idx, artifact: str | None, say) -> dict:
    """Make the demo's index and trained fusion model what ``build_reranker()`` / ``fusionrank serve`` use."""
    from workers.deploy import install_local_index, install_model, install_opensearch_index, model_fits

    if artifact is None:
        say("      (no fusion model was trained: nothing installed for serving)")
        return {"installed": False}
    # the index first: an installed alias the new model cannot serve (e.g. one from before products-v3, whose model
    # reads image_colour) is replaced when an earlier demo made it, refused when it is the user's own
    if settings.engine == "opensearch":  # the production stack: the api searches OpenSearch, so the index goes there
        from workers.commands.opensearch import build_opensearch_engine

        engine = build_opensearch_engine(settings)
        try:
            index, note = install_opensearch_index(settings, engine, idx, fits=model_fits(artifact))
            engine_path = engine.display_url
        finally:
            engine.close()
            idx.engine.close()
    else:
        idx.engine.close()
        engine_path, index, note = install_local_index(settings, idx.path / "engine", idx.alias, fits=model_fits(artifact))
    model_dir, version = install_model(settings, artifact)
    say(f"      serving: model {version} installed as {settings.effective_model_dir}; index alias {settings.index_alias!r} -> {index} ({note}).")
    say("      The drop-in call now works: build_reranker().rerank(query, opensearch_response, user_id=...)")
    return {"installed": True, "model_dir": str(model_dir), "model_version": version, "engine": str(engine_path), "index": index, "note": note}


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        synthetic: bool = typer.Option(False, "--synthetic", help="Use a generated catalog even when ../shared/data exists."),
        synthetic_size: int = typer.Option(300, "--synthetic-size", min=20, help="Products in the generated catalog."),
        systems: str = typer.Option(",".join(DEMO_SYSTEMS), "--systems", help="Systems in the evaluation table."),
        limit_queries: Optional[int] = typer.Option(None, "--limit-queries", min=1, help="Evaluate a seeded sample of N test queries."),
        train_minutes: float = typer.Option(10.0, "--train-minutes", min=0.01, help="Time budget of the fusion ranker's training loop."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw NDCG@10 per system into this PNG."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every step's result."),
    ) -> None:
        """Index the bundled catalog, import the (simulated) shopper history, search, and print the evaluation table."""
        from rerank.evaluation.harness import EvalRequest, cached_index, evaluate
        from rerank.evaluation.report import format_table, plot_ndcg
        from workers.jobs import run_index_job
        from workers.settings import load_settings

        settings = load_settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        show = sys.stderr.isatty()
        say = (lambda *a, **k: None) if as_json else typer.echo
        out: dict = {"steps": {}}

        data, is_synthetic = demo_data(settings, synthetic=synthetic, synthetic_size=synthetic_size)
        if is_synthetic:
            say(f"[1/5] no ../shared/data/fashion found (or --synthetic): generated a synthetic catalog of drawn products in {data.catalog.parent}")
        else:
            say(f"[1/5] catalog: {data.catalog} (real products and photos; see ../shared/data/README.md)")
        out["steps"]["data"] = {"dataset": data.name, "catalog": str(data.catalog), "synthetic": is_synthetic}

        def indexer(engine, job):
            return run_index_job(engine, settings, job, via="inline", progress=show)

        say("[2/5] indexing text and image embeddings into the embedded engine (first run only; later runs reuse it) ...")
        idx = cached_index(
            data.catalog, data.images_root, data_dir=settings.data_dir, indexer=indexer, text_model=settings.text_model,
            text_backend=settings.text_backend, image_model=settings.image_model, device=settings.device, mapping=settings.mapping,
        )
        s = idx.summary
        say(f"      {idx.engine.count(idx.alias)} products searchable in {idx.path} "
            f"(indexed {s.get('indexed')}, failed {s.get('failed')}; {s.get('docs_per_s')} docs/s when built)")
        out["steps"]["index"] = {"path": str(idx.path), "count": idx.engine.count(idx.alias), "build": s}

        if data.events is not None:
            from rerank.history import HistoryStore, import_events_file, upgrade

            url = settings.effective_sql_url
            upgrade(url)
            with HistoryStore(url) as store:
                ev = import_events_file(store, data.events, progress=show)
                users = store.count_users()
            say(f"[3/5] simulated shopper history in {settings.effective_sql_url.split('///')[-1]}: "
                f"stored {ev.stored} new events, {ev.duplicates} already there, {ev.rejected} rejected; {users} users")
            out["steps"]["history"] = {**ev.to_dict(), "users": users, "note": "simulated shoppers"}
        else:
            say("[3/5] no shopper history for the synthetic catalog: skipped")

        from indexing.encoders import get_text_encoder
        from rerank.retrieval.retriever import Retriever

        retriever = Retriever(idx.engine, idx.alias, text_encoder=get_text_encoder(settings.text_model, backend=settings.text_backend, device=settings.device))
        say("[4/5] hybrid search (BM25 + kNN on text vectors, RRF), top 3:")
        examples = {}
        for q in EXAMPLE_QUERIES:
            cs = retriever.retrieve(q, top_n=3, with_source=True)
            examples[q] = [{"id": c.id, "title": (c.source or {}).get("title")} for c in cs.candidates]
            say(f"      {q!r}: " + " | ".join(f"{e['title']}" for e in examples[q]))
        out["steps"]["search"] = examples

        names = tuple(n.strip() for n in systems.split(",") if n.strip())
        say(f"[5/5] evaluating {', '.join(names)} on the held-out test queries of {data.name} (retrieve mode: whole catalog) ...")
        req = EvalRequest(
            catalog=data.catalog, queries=data.queries, qrels=data.qrels, gain=data.gain, mode="retrieve", systems=names,
            images_root=data.images_root, limit_queries=limit_queries, dataset=data.name, text_model=settings.text_model,
            text_backend=settings.text_backend, image_model=settings.image_model, device=settings.device,
            mapping=settings.mapping, progress=show, options={"fusion_options": {"max_minutes": train_minutes}},
        )
        report = evaluate(req, data_dir=settings.data_dir, indexer=indexer)
        out["evaluation"] = report.to_json()
        out["steps"]["serving"] = install_for_serving(settings, idx, report.info.get("artifacts", {}).get("fusion"), say)
        if plot is not None:
            plot_ndcg(report, plot)
        if as_json:
            typer.echo(json.dumps(out, default=str))
            return
        typer.echo(format_table(report))
        if plot is not None:
            typer.echo(f"plot: {plot}")
        typer.echo(
            "Labels are derived from catalog metadata (not human judges); queries are template-made."
            if not is_synthetic else "Synthetic data: the labels come from generated metadata."
        )
        if "fusion" not in names:
            typer.echo("The fusion reranker was not among --systems: nothing was trained or installed for serving.")
