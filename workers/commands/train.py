"""``fusionrank train``: train the multimodal fusion ranker into a versioned artifact directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def log_coverage_lines(report: dict) -> list[str]:
    """For each dataset labelled by a log: how much of the first stage its judgments cover (the training queries')."""
    out = []
    for name, d in (report.get("datasets") or {}).items():
        cov = (d.get("log_coverage") or {}).get("train") or {}
        if cov.get("all") is not None:
            out.append(f"{name}: the log judged {cov['top10']:.0%} of the first stage's top 10 for its {cov['queries']} training queries "
                       f"({cov['all']:.0%} of every candidate); what it never showed trains as irrelevant")
    return out


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        catalog: Optional[Path] = typer.Option(None, "--catalog", help="Catalog file the queries are judged against."),
        queries: Optional[Path] = typer.Option(None, "--queries", help="Queries TSV: query_id, query, user_id."),
        qrels: Optional[Path] = typer.Option(None, "--qrels", help="TREC qrels: query_id 0 product_id grade."),
        dataset: list[str] = typer.Option([], "--dataset", help="Another training dataset (repeatable): catalog=C,queries=Q,qrels=R"
                                           "[,events=E][,images_root=D][,gain=identity|minus1][,mode=rerank|retrieve][,name=N]."),
        out: Path = typer.Option(..., "--out", help="Artifact directory to write (config.json + weights.safetensors + training_report.json)."),
        events: Optional[Path] = typer.Option(None, "--events", help="Events CSV of the queries' users (history)."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder image paths are relative to (default: the catalog's folder)."),
        gain: str = typer.Option("identity", "--gain", help="Grade -> gain: identity (fashion 0/1/2) | minus1 (Home Depot 1..3)."),
        strategy: str = typer.Option("attention", "--strategy", help="Fusion strategy: concat | weighted | attention."),
        loss: str = typer.Option("softmax", "--loss", help="Listwise loss: softmax | lambda."),
        epochs: int = typer.Option(40, "--epochs", min=1, help="Most epochs (early stopping on validation NDCG@10)."),
        patience: int = typer.Option(6, "--patience", min=1, help="Epochs without validation gain before stopping."),
        min_epochs: int = typer.Option(15, "--min-epochs", min=0, help="Early stopping waits for this many epochs (a small validation split is noisy)."),
        seed: int = typer.Option(13, "--seed", help="Seed of the splits (same as fusionrank eval) and of training."),
        max_minutes: float = typer.Option(10.0, "--max-minutes", min=0.01, help="Time budget of the training loop."),
        no_image: bool = typer.Option(False, "--no-image", help="Ablation: no photo input (image modality and knn_image list off)."),
        no_history: bool = typer.Option(False, "--no-history", help="Ablation: no user-history input."),
        text_only: bool = typer.Option(False, "--text-only", help="Ablation: text and first-stage inputs only (= --no-image --no-history)."),
        no_colour: bool = typer.Option(False, "--no-colour", help="No colour head (the photo's colour read against the query's; on by default when the catalog has colours)."),
        no_intent: bool = typer.Option(False, "--no-intent", help="No query-intent bound (by default the product type the query names outranks the model's and the history's preference, when the catalog has types)."),
        no_history_agreement: bool = typer.Option(False, "--no-history-agreement", help="The history without its attribute agreement (by default the ranker compares each candidate's categorical fields with the history products')."),
        no_attribute_match: bool = typer.Option(False, "--no-attribute-match", help="No query-to-attribute agreement inputs (by default, with the intent block: does the product's catalog value, or its photo-completed one, agree with the colour, type, gender and usage the query names)."),
        attribute_predictions: bool = typer.Option(False, "--attribute-predictions", help="The agreement inputs also read the photo's prediction where indexing did not complete the attribute (below the completion threshold), with its confidence."),
        align_catalog: Optional[Path] = typer.Option(None, "--align-catalog", help="(title, photo) pairs for the text-image alignment (default: --catalog); e.g. fashion/products.csv for full titles."),
        align_images_root: Optional[Path] = typer.Option(None, "--align-images-root", help="Images root of --align-catalog (default: its folder)."),
        alignment: Optional[Path] = typer.Option(None, "--alignment", help="Use this trained alignment directory instead of training one."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads for training (default: torch's; 1 on a busy shared CPU)."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bars (default: when stderr is a terminal)."),
        as_json: bool = typer.Option(False, "--json", help="Print the training report as JSON."),
        from_ubi: Optional[Path] = typer.Option(None, "--from-ubi", help="Train from a UBI search log (queries + events JSONL, a file or a "
                                                "folder) with --catalog, no qrels: implicit judgments of a click model."),
        click_model: str = typer.Option("pbm", "--click-model", help="--from-ubi: pbm (debiased, default) | sdbn | ctr (naive)."),
        exclude_queries: Optional[Path] = typer.Option(None, "--exclude-queries", help="--from-ubi: leave these queries' searches out "
                                                       "(a queries TSV; e.g. the ones you will evaluate on)."),
        no_behaviour: bool = typer.Option(False, "--no-behaviour", help="--from-ubi: without the log's behaviour features (debiased "
                                          "click-through per query-product and per product; default: the model reads them)."),
    ) -> None:
        """Train the fusion ranker (alignment, listwise loss, early stopping) and write its artifact."""
        from rerank.training.ranker import DatasetSpec, TrainConfig, train_ranker
        from workers.jobs import run_index_job
        from workers.settings import load_settings

        settings = load_settings()
        show = sys.stderr.isatty() if progress is None else progress
        if from_ubi is not None:
            from rerank.datasets.data import read_queries
            from rerank.datasets.ubi_judgments import write_ubi_judgments

            if catalog is None or queries is not None or qrels is not None:
                raise typer.BadParameter("--from-ubi takes --catalog (the products the log shows) and no --queries/--qrels")
            excl = [q.text for q in read_queries(exclude_queries).queries] if exclude_queries is not None else []
            uj = write_ubi_judgments(from_ubi, settings.data_dir / "ubi-judgments", exclude=excl, model=click_model)
            typer.echo(f"UBI judgments ({click_model}): {uj.info['queries']} queries, {uj.info['judgments']} judged pairs, "
                       f"spam capping {uj.info['spam_capping']}; {uj.qrels}", err=True)
            queries, qrels = uj.queries, uj.qrels
            dataset = list(dataset)
            # the log's query texts train and validate (no test share: evaluate on queries left out with --exclude-queries)
            given_ubi = DatasetSpec.from_log(catalog, queries, qrels, events=events, images_root=images_root or catalog.parent,
                                             name=f"ubi-{click_model}", validation_qrels=uj.validation_qrels,
                                             label_part_qrels=uj.label_part_qrels, label_part_behaviour=uj.label_part_behaviour)
            behaviour_stats = None if no_behaviour else uj.behaviour
        else:
            given_ubi = None
            if no_behaviour:
                raise typer.BadParameter("--no-behaviour goes with --from-ubi (only a log gives behaviour features)")
            behaviour_stats = None
        given = (catalog, queries, qrels)
        if given_ubi is None and any(given) and not all(given):
            raise typer.BadParameter("--catalog, --queries and --qrels go together (or describe each dataset with --dataset)")
        if given_ubi is not None:
            datasets = [given_ubi]
        else:
            datasets = [DatasetSpec(catalog=catalog, queries=queries, qrels=qrels, gain=gain, events=events, images_root=images_root or catalog.parent)] if all(given) else []
        datasets += [DatasetSpec.parse(d) for d in dataset]
        if not datasets:
            raise typer.BadParameter("no training data: give --catalog/--queries/--qrels and/or --dataset")
        cfg = TrainConfig(
            strategy=strategy,
            loss=loss,
            epochs=epochs,
            patience=patience,
            min_epochs=min_epochs,
            seed=seed,
            max_minutes=max_minutes,
            use_image=not (no_image or text_only),
            use_history=not (no_history or text_only),
            use_colour=not no_colour,
            use_intent=not no_intent,
            history_agreement=not no_history_agreement,
            use_attribute_match=not no_attribute_match,
            attribute_predictions=attribute_predictions,
            device=settings.device,
            threads=threads,
            text_model=settings.text_model,
            text_backend=settings.text_backend,
            image_model=settings.image_model,
            mapping=settings.mapping,
            attribute_model=str(settings.attribute_model_dir.resolve()) if settings.attribute_model_dir else None,
            attribute_threshold=settings.attribute_completion_threshold,
            align_catalog=align_catalog,
            align_images_root=align_images_root or (align_catalog.parent if align_catalog else None),
            alignment_dir=alignment,
            progress=show,
            behaviour_stats=behaviour_stats,
        )

        def indexer(engine, job):
            return run_index_job(engine, settings, job, via="inline", progress=show)

        result = train_ranker(datasets, out=out, data_dir=settings.data_dir, indexer=indexer, config=cfg)
        rep = result.report
        if as_json:
            typer.echo(json.dumps({k: v for k, v in rep.items() if k != "history"}, default=str))
        else:
            al = rep.get("alignment") or {}
            typer.echo(f"artifact: {result.artifact}")
            for line in log_coverage_lines(rep):
                typer.echo(line)
            if al:
                typer.echo(f"alignment: held-out text->image recall@10 {al['recall_at_10']:.3f} (chance {al['chance_recall_at_10']:.3f})")
            col = rep.get("colour") or {}
            if col.get("heldout_accuracy") is not None:
                typer.echo(f"colour head: {col['colours']} colours, held-out accuracy {col['heldout_accuracy']:.3f} "
                           f"(top 3 {col['heldout_top3_accuracy']:.3f}; majority colour {col['majority_accuracy']:.3f})")
            it = rep.get("intent") or {}
            if it:
                typer.echo(f"intent bound: {', '.join(it['bound'])} (catalog values: "
                           f"{', '.join(f'{a} {n}' for a, n in it['values'].items())}); the verdict judges the bounded scores")
            typer.echo(
                f"validation NDCG@10 {rep['best_validation_ndcg@10']:.4f} (untrained {rep['untrained_validation_ndcg@10']:.4f}); "
                f"best epoch {rep['best_epoch']} of {rep['epochs_run']}; {rep['stopped']}"
            )
            sv = rep["serving"]
            v = sv["verdict"]
            typer.echo(f"the model against the first stage on {v['validation_queries']} validation queries (paired randomization test):")
            nan = float("nan")
            typer.echo(f"  {'model':<12} NDCG@10 {v.get('model_ndcg@10') or nan:.4f}  MRR@10 {v.get('model_mrr@10') or nan:.4f}")
            for name, b in v["baselines"].items():
                t, tm = b["model_vs"], b["model_vs_mrr"]
                p = "n/a" if t["p"] is None else f"{t['p']:.4f}"
                pm = "n/a" if tm["p"] is None else f"{tm['p']:.4f}"
                typer.echo(f"  {name:<12} NDCG@10 {b['ndcg@10']:.4f} (model {t['diff']:+.4f}, p {p})  MRR@10 {b['mrr@10']:.4f} (model {tm['diff']:+.4f}, p {pm})"
                           f"{'  model significantly better' if b['model_better'] else ''}{'  model significantly worse at MRR' if b['model_worse_mrr'] else ''}"
                           f"{'  <- best signal' if name == v['best_signal'] else ''}")
            typer.echo(f"verdict: {v['summary']}")
            typer.echo(f"serving: {'the trained model' if sv['policy'] == 'model' else 'the safe choice, ' + str(sv['signal']) + ' (written to config.json)'}")
