"""``fusionrank attributes train``: the photo attribute heads (colour, article type, gender, usage) from a catalog."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer


def finetune_options(prefix: str = "") -> tuple[Any, Any, Any]:
    """The ``--finetune-epochs``, ``--finetune-lr`` and ``--calibrate/--no-calibrate`` options (``attributes train``;
    ``eval --attributes`` with ``prefix="With --attributes: "``)."""

    def h(text: str) -> str:
        return prefix + text[0].lower() + text[1:] if prefix else text

    return (
        typer.Option(None, "--finetune-epochs", min=1, help=h("Epochs of the fine-tuned branch (default 6, early-stopped; large catalogs: 10).")),
        typer.Option(None, "--finetune-lr", min=0.0, help=h("Peak learning rate of the branch's copied blocks (default 3e-4; large catalogs: "
                                                            "1e-3 with --finetune-epochs 10).")),
        typer.Option(True, "--calibrate/--no-calibrate", help=h("Fit softmax temperatures of the colour head's regression, branch and mix on "
                                                                "the validation split, so that a confidence of 0.8 is right about 80% of the "
                                                                "time (attribute model version 4); --no-calibrate: the version-3 mix.")),
    )


EPOCHS_OPTION, LR_OPTION, CALIBRATE_OPTION = finetune_options()


def register(app: typer.Typer, bench: typer.Typer) -> None:
    attrs = typer.Typer(help="Photo attribute heads: product attributes read from the photo at indexing time.", no_args_is_help=True)
    app.add_typer(attrs, name="attributes")

    @attrs.command("train")
    def train_cmd(
        catalog: Path = typer.Option(..., "--catalog", help="Catalog whose labelled, photographed products train the heads."),
        out: Path = typer.Option(..., "--out", help="Directory of the model (config.json + weights.safetensors); set FUSIONRANK_ATTRIBUTE_MODEL_DIR to it."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder image paths are relative to (default: the catalog's folder)."),
        seed: int = typer.Option(13, "--seed", help="Seed of the held-out split."),
        as_json: bool = typer.Option(False, "--json", help="Print the held-out report as JSON."),
        no_regions: bool = typer.Option(False, "--no-regions", help="Every head reads the pixel features and the pooled image vector "
                                        "only: no region features (cheaper indexing, a less accurate colour head)."),
        finetune: bool = typer.Option(True, "--finetune/--no-finetune", help="The colour head also gets a fine-tuned branch: a copy of the "
                                      "image model's last blocks and head convolution trained on the catalog's colour labels, mixed with the "
                                      "regression (attribute model version 4; about 10-15 minutes on one CPU thread for 3,200 photos). --no-finetune: the version-2 recipe "
                                      "(--no-regions implies it)."),
        finetune_epochs: Optional[int] = EPOCHS_OPTION,
        finetune_lr: Optional[float] = LR_OPTION,
        calibrate: bool = CALIBRATE_OPTION,
    ) -> None:
        """Train the heads on the catalog's labelled photos (a held-out share measured) and save the model."""
        from indexing.encoders import get_image_encoder
        from indexing.photo_attributes import model_id_of
        from rerank.datasets.attribute_photos import train_from_catalog
        from workers.settings import load_settings

        settings = load_settings()
        enc = get_image_encoder(settings.image_model, device=settings.device)
        model, data = train_from_catalog(catalog, images_root, enc, cache_dir=settings.data_dir, seed=seed, regions=not no_regions,
                                         finetune=finetune and not no_regions, progress=sys.stderr.isatty(),
                                         finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, calibrate=calibrate)
        model.save(out)
        report = {"model": str(out), "model_id": model_id_of(out), "photos": len(data.ids), "report": model.report}
        typer.echo(json.dumps(report) if as_json else json.dumps(report, indent=2))
