"""``fusionrank eval``: every baseline (and later the fusion models) on the same queries, one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from workers.commands.attributes import finetune_options

EVAL_EPOCHS_OPTION, EVAL_LR_OPTION, EVAL_CALIBRATE_OPTION = finetune_options("With --attributes: ")


def _model_dirs(values: list[str], systems: list[str]) -> dict[str, Path]:
    """``--model SYSTEM=DIR`` (repeatable); a bare ``DIR`` when exactly one trainable system is evaluated."""
    from indexing.errors import ConfigError
    from rerank.evaluation.systems import SYSTEMS

    out: dict[str, Path] = {}
    trainable = [s for s in systems if SYSTEMS.get(s).trainable]
    for v in values:
        if "=" in v:
            name, d = v.split("=", 1)
            SYSTEMS.get(name)
        elif len(trainable) == 1:
            name, d = trainable[0], v
        else:
            raise ConfigError(f"--model {v!r}: say which system it is for (SYSTEM=DIR); trainable systems here: {', '.join(trainable) or 'none'}")
        p = Path(d)
        if not p.is_dir():
            raise ConfigError(f"--model {v!r}: {p} is not a directory")
        out[name] = p
    return out


def parse_fusion_options(items: list[str]) -> dict:
    """``["max_minutes=2", "loss=lambda"]`` -> ``{"max_minutes": 2.0, "loss": "lambda"}`` (numbers parsed; keys
    checked by the harness against :data:`rerank.evaluation.systems.FUSION_TRAIN_OPTIONS`)."""
    from indexing.errors import ConfigError
    from rerank.evaluation.systems import FUSION_TRAIN_OPTIONS

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--fusion-option takes KEY=VALUE, got {item!r}")
        if key not in FUSION_TRAIN_OPTIONS:
            raise ConfigError(f"unknown --fusion-option {key!r}; valid: {', '.join(FUSION_TRAIN_OPTIONS)}")
        raw = raw.strip()
        for conv in (int, float):
            try:
                out[key] = conv(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


def parse_subsets(items: list[str]) -> dict[str, str]:
    """``["colour=\\b(red|blue)\\b"]`` -> ``{"colour": "\\b(red|blue)\\b"}`` (the regex is checked by the harness)."""
    from indexing.errors import ConfigError

    out: dict[str, str] = {}
    for item in items:
        name, sep, rx = item.partition("=")
        if not sep or not name.strip() or not rx:
            raise ConfigError(f"--subset takes NAME=REGEX, got {item!r}")
        out[name.strip()] = rx
    return out


def parse_diversity_list(text: str | None) -> tuple:
    """``"0,0.1,0.3,auto"`` -> ``(0.0, 0.1, 0.3, "auto")`` (each checked: a number in [0, 1] or auto)."""
    from rerank.diversity import parse_diversity

    if text is None:
        return ()
    return tuple(parse_diversity(v.strip(), what="--diversity") for v in text.split(",") if v.strip())


#: ``--diversity-option`` keys (fields of rerank.diversity.DiversityConfig)
DIVERSITY_OPTIONS = ("text_weight", "image_weight", "colour_weight", "colour_name_weight", "auto_max", "qualifier_weight", "history_scale", "relevance_window")


def parse_diversity_options(items: list[str], settings=None):
    """``["auto_max=0.4"]`` -> a :class:`rerank.diversity.DiversityConfig` (the settings' weights and auto_max first)."""
    from dataclasses import replace

    from indexing.errors import ConfigError
    from rerank.diversity import DiversityConfig

    cfg = settings.diversity_config() if settings is not None and hasattr(settings, "diversity_config") else DiversityConfig()
    kw: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in DIVERSITY_OPTIONS:
            raise ConfigError(f"--diversity-option takes KEY=VALUE with KEY one of {', '.join(DIVERSITY_OPTIONS)}, got {item!r}")
        try:
            kw[key] = float(raw)
        except ValueError:
            raise ConfigError(f"--diversity-option {key}: a number, got {raw!r}") from None
    return replace(cfg, **kw)


def _eval_attributes(catalog: Path, images_root: Optional[Path], *, as_json: bool, progress: Optional[bool], seed: int,
                     regions: bool = True, finetune: bool = False, finetune_epochs: Optional[int] = None,
                     finetune_lr: Optional[float] = None, calibrate: bool = True) -> None:
    from indexing.encoders import get_image_encoder
    from rerank.datasets.attribute_photos import train_from_catalog
    from workers.settings import load_settings

    settings = load_settings()
    show = sys.stderr.isatty() if progress is None else progress
    enc = get_image_encoder(settings.image_model, device=settings.device)
    model, data = train_from_catalog(catalog, images_root, enc, cache_dir=settings.data_dir, seed=seed, regions=regions,
                                     finetune=finetune, progress=show, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                                     calibrate=calibrate)
    out = {"attributes": {a: {k: model.report[a][k] for k in ("top1", "top3", "majority", "n")} for a in model.heads}}
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"photo attribute heads, held-out photos of {catalog} ({len(data.ids)} photos)")
    typer.echo(f"{'attribute':<14}{'top-1':>8}{'top-3':>8}{'majority':>10}{'n':>7}{'classes':>9}")
    for a in model.heads:
        r = model.report[a]
        typer.echo(f"{a:<14}{r['top1']:>8.3f}{r['top3']:>8.3f}{r['majority']:>10.3f}{r['n']:>7d}{r['classes']:>9d}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        catalog: Path = typer.Option(..., "--catalog", help="Catalog file (CSV / JSONL / Parquet) the queries are judged against."),
        queries: Optional[Path] = typer.Option(None, "--queries", help="Queries TSV: query_id, query, user_id (required unless --attributes)."),
        qrels: Optional[Path] = typer.Option(None, "--qrels", help="TREC qrels: query_id 0 product_id grade (int or float grades; required unless --attributes)."),
        gain: Optional[str] = typer.Option(None, "--gain", help="Grade -> gain mapping: minus1 (Home Depot ratings 1..3) | identity (fashion 0/1/2); required unless --attributes."),
        attributes: bool = typer.Option(False, "--attributes", help="Instead of ranking: train the photo attribute heads (colour, article_type, "
                                        "gender, usage) on the catalog's labelled photos and print each head's held-out top-1 / top-3 "
                                        "beside the majority-class baseline."),
        no_regions: bool = typer.Option(False, "--no-regions", help="With --attributes: every head reads the pixel features and "
                                        "the pooled image vector only (the colour head then skips the region features)."),
        finetune: bool = typer.Option(True, "--finetune/--no-finetune", help="With --attributes: the colour head also gets a fine-tuned "
                                      "branch (the image model's last blocks trained on the catalog's labels; attribute model version 4); "
                                      "--no-finetune: the version-2 recipe (--no-regions implies it)."),
        finetune_epochs: Optional[int] = EVAL_EPOCHS_OPTION,
        finetune_lr: Optional[float] = EVAL_LR_OPTION,
        calibrate: bool = EVAL_CALIBRATE_OPTION,
        events: Optional[Path] = typer.Option(None, "--events", help="Events CSV of the evaluated users (history)."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder image paths are relative to (default: the catalog's folder)."),
        mode: str = typer.Option("rerank", "--mode", help="rerank: reorder each query's judged products; retrieve: rank the whole catalog."),
        systems: str = typer.Option(",".join(("random", "bm25", "knn_text", "knn_image", "hybrid_minmax", "hybrid_rrf", "lambdamart", "cross_encoder")),
                                    "--systems", help="Comma-separated systems to evaluate."),
        split: str = typer.Option("test", "--split", help="Split evaluated when no --train-* files are given: test | validation | train | all."),
        train_queries: Optional[Path] = typer.Option(None, "--train-queries", help="Train trainable systems on these queries (then all of --queries is evaluated)."),
        train_qrels: Optional[Path] = typer.Option(None, "--train-qrels", help="Qrels of --train-queries."),
        train_events: Optional[Path] = typer.Option(None, "--train-events", help="Events of the training users."),
        train_catalog: Optional[Path] = typer.Option(None, "--train-catalog", help="Catalog of the training queries (default: --catalog)."),
        train_images_root: Optional[Path] = typer.Option(None, "--train-images-root", help="Images root of --train-catalog."),
        train_ubi: Optional[Path] = typer.Option(None, "--train-ubi", help="Train trainable systems from this UBI search log (queries + "
                                                 "events JSONL, a file or a folder) instead of qrels: implicit judgments of a click model, "
                                                 "every evaluated query's searches left out."),
        click_model: str = typer.Option("pbm", "--click-model", help="--train-ubi: pbm (position-based, EM; debiased, default) | "
                                        "sdbn (simplified DBN) | ctr (naive click-through rate, no position correction)."),
        ubi_unshown: str = typer.Option("irrelevant", "--ubi-unshown", help="--train-ubi: products the log never showed for a query are "
                                        "irrelevant (gain 0, as unjudged qrels; default: it won on held-out queries) | unknown (left out of its training list)."),
        head_queries: Optional[int] = typer.Option(None, "--head-queries", min=1, help="--train-ubi: evaluate only the split's queries with "
                                                   "at least N searches in the log (head queries); their searches stay in the training log."),
        ubi_validation_share: float = typer.Option(0.3, "--ubi-validation-share", min=0.0, max=1.0, help="--train-ubi: the share of the "
                                                   "log's query texts the trainable systems validate on (early stopping, the fusion verdict, "
                                                   "whose paired test needs more queries on click labels); the rest trains."),
        ubi_labels: str = typer.Option("clicks", "--ubi-labels", help="--train-ubi: what labels the log's training and validation "
                                       "queries: clicks (the click model's judgments, default) | qrels (the graded --qrels of the same query "
                                       "texts, same split and behaviour columns: the reference learning from clicks is measured against)."),
        model: list[str] = typer.Option([], "--model", help="Use a trained artifact instead of training: SYSTEM=DIR (repeatable)."),
        limit_queries: Optional[int] = typer.Option(None, "--limit-queries", min=1, help="Evaluate a seeded sample of N queries of the split."),
        top_n: int = typer.Option(200, "--top-n", min=1, max=10_000, help="retrieve mode: candidates per list and fused pool size."),
        rerank_depth: int = typer.Option(100, "--rerank-depth", min=1, max=10_000, help="retrieve mode: how deep the cross-encoder reorders the pool."),
        ce_pairs: int = typer.Option(3000, "--ce-pairs", min=1, help="cross_encoder: (query, product) training pairs (1 epoch; CPU cost grows linearly)."),
        subset: list[str] = typer.Option([], "--subset", help="Also report a query subset, NAME=REGEX on the query text (repeatable), "
                                          "e.g. colour='\\b(black|white|red)\\b'."),
        train_also: list[str] = typer.Option([], "--train-also", help="Another dataset the fusion systems train on (repeatable; same form "
                                              "as `fusionrank train --dataset`): catalog=C,queries=Q,qrels=R[,events=E][,gain=G][,mode=M]."),
        fusion_option: list[str] = typer.Option([], "--fusion-option", help="Training option of the fusion systems, KEY=VALUE (repeatable): "
                                                "max_minutes, epochs, patience, loss (softmax|lambda), lr, batch_size, d_model, hidden, history_k, ..."),
        seed: int = typer.Option(13, "--seed", help="Seed of the splits, the random baseline and training."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Name shown in the report (default: from the queries path)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw NDCG@10 per system into this PNG file."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bars (default: when stderr is a terminal)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="local | opensearch (default: FUSIONRANK_ENGINE). opensearch: the local "
                                             "evaluation index is copied into FUSIONRANK_OPENSEARCH_URL and every system searches there."),
        diversity: Optional[str] = typer.Option(None, "--diversity", help="Score the fusion systems with the rerank call's diversity step at "
                                                "these lambdas, e.g. 0,0.1,0.3,auto: one trade-off row per lambda (several: JSON by_diversity)."),
        diversity_option: list[str] = typer.Option([], "--diversity-option", help="The diversity step's settings, KEY=VALUE (repeatable): "
                                                   "text_weight, image_weight, colour_weight, auto_max, qualifier_weight, history_scale, relevance_window "
                                                   "(default: the FUSIONRANK_DIVERSITY_TEXT_WEIGHT/_IMAGE_WEIGHT/_COLOUR_WEIGHT settings)."),
        attributes_catalog: Optional[Path] = typer.Option(None, "--attributes-catalog", help="Count distinct@10 (type, colour, brand) with "
                                                          "this catalog's values instead of the index's (e.g. one with the colours the "
                                                          "evaluated catalog withheld)."),
    ) -> None:
        """Evaluate baselines on a catalog + queries + graded qrels (NDCG@10, MRR@10, Recall@100, judged@10, and the
        diversity of each top 10: ild@10, distinct@10 per attribute)."""
        if attributes:
            _eval_attributes(catalog, images_root, as_json=as_json, progress=progress, seed=seed, regions=not no_regions,
                             finetune=finetune and not no_regions, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                             calibrate=calibrate)
            return
        missing = [flag for flag, v in (("--queries", queries), ("--qrels", qrels), ("--gain", gain)) if v is None]
        if missing:
            raise typer.BadParameter(f"{', '.join(missing)} required (or --attributes for the photo attribute heads)")
        from rerank.evaluation.harness import EvalRequest, evaluate
        from rerank.training.ranker import DatasetSpec
        from rerank.evaluation.report import format_table, format_tradeoff, plot_ndcg, plot_tradeoff
        from workers.jobs import run_index_job
        from workers.settings import load_settings

        settings = load_settings()
        show = sys.stderr.isatty() if progress is None else progress
        names = [s.strip() for s in systems.split(",") if s.strip()]
        req = EvalRequest(
            catalog=catalog,
            queries=queries,
            qrels=qrels,
            gain=gain,
            mode=mode,
            systems=tuple(names),
            split=split,
            events=events,
            images_root=images_root or catalog.parent,
            train_queries=train_queries,
            train_qrels=train_qrels,
            train_events=train_events,
            train_catalog=train_catalog,
            train_images_root=train_images_root or (train_catalog.parent if train_catalog else None),
            model_dirs=_model_dirs(model, names),
            limit_queries=limit_queries,
            top_n=top_n,
            rerank_depth=rerank_depth,
            seed=seed,
            dataset=dataset,
            text_model=settings.text_model,
            text_backend=settings.text_backend,
            image_model=settings.image_model,
            device=settings.device,
            mapping=settings.mapping,
            attribute_model=str(settings.attribute_model_dir.resolve()) if settings.attribute_model_dir else None,
            attribute_threshold=settings.attribute_completion_threshold,
            options={"ce_max_pairs": ce_pairs, "fusion_options": parse_fusion_options(fusion_option)},
            subsets=parse_subsets(subset),
            train_also=tuple(DatasetSpec.parse(d) for d in train_also),
            train_ubi=train_ubi,
            click_model=click_model,
            ubi_unshown=ubi_unshown,
            head_queries=head_queries,
            ubi_validation_share=ubi_validation_share,
            ubi_labels=ubi_labels,
            progress=show,
            diversity=parse_diversity_list(diversity),
            diversity_config=parse_diversity_options(diversity_option, settings),
            attributes_catalog=attributes_catalog,
        )

        def indexer(engine, job):
            return run_index_job(engine, settings, job, via="inline", progress=show)

        search_engine = None
        engine_name = engine or settings.engine
        if engine_name == "opensearch":
            from workers.commands.opensearch import build_opensearch_engine

            search_engine = build_opensearch_engine(settings)
        elif engine_name != "local":
            from indexing.errors import UnknownNameError

            raise UnknownNameError("engine", engine_name, ["local", "opensearch"])
        try:
            report = evaluate(req, data_dir=settings.data_dir, indexer=indexer, search_engine=search_engine, hnsw_engine=settings.hnsw_engine)
        finally:
            if search_engine is not None:
                search_engine.close()
        if plot is not None:
            (plot_tradeoff if report.by_diversity else plot_ndcg)(report, plot)
        if as_json:
            typer.echo(json.dumps(report.to_json()))
        else:
            if report.by_diversity:
                typer.echo(format_tradeoff(report))
                typer.echo("")
            typer.echo(format_table(report))
            check = report.info.get("pipeline_fusion")
            if isinstance(check, dict):
                from rerank.evaluation.pipeline_check import summary_line

                typer.echo(summary_line(check))
            if plot is not None:
                typer.echo(f"plot: {plot}")
