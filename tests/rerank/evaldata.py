"""A small, real slice of the fashion benchmark for harness and retrieval tests (built once per session)."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Slice:
    catalog: Path
    queries: Path
    qrels: Path
    images_root: Path
    n_queries: int


def build_fashion_slice(shared: Path, out: Path, *, n_queries: int = 16, judged_per_query: int = 8, others: int = 80,
                        with_images: bool = False, seed: int = 0) -> Slice:
    """``n_queries`` dev queries, ``judged_per_query`` of each one's judged products (both grades when
    possible), ``others`` unjudged catalog products; qrels restricted to the slice's catalog."""
    rng = random.Random(seed)
    bench = shared / "fashion" / "bench"
    with open(bench / "dev" / "queries.tsv", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    qids = [r[0] for r in rows[:n_queries]]
    grades: dict[str, dict[str, str]] = {}
    with open(bench / "dev" / "qrels.tsv", encoding="utf-8") as f:
        for line in f:
            q, _, d, g = line.split()
            if q in qids:
                grades.setdefault(q, {})[d] = g
    keep: dict[str, dict[str, str]] = {}
    for q in qids:
        by = grades.get(q, {})
        twos = sorted(d for d, g in by.items() if g == "2")
        ones = sorted(d for d, g in by.items() if g != "2")
        pick = rng.sample(twos, min(len(twos), judged_per_query // 2))
        pick += rng.sample(ones, min(len(ones), judged_per_query - len(pick)))
        keep[q] = {d: by[d] for d in pick}
    wanted = {d for v in keep.values() for d in v}
    with open(bench / "catalog.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fieldnames = reader.fieldnames
        all_rows = list(reader)
    judged_all = {d for v in grades.values() for d in v}
    pool = [r for r in all_rows if r["product_id"] not in judged_all]
    chosen = [r for r in all_rows if r["product_id"] in wanted] + rng.sample(pool, others)
    out.mkdir(parents=True, exist_ok=True)
    cat = out / "catalog.csv"
    with open(cat, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        for r in chosen:
            w.writerow(r if with_images else {**r, "image": ""})
    qp = out / "queries.tsv"
    qp.write_text("query_id\tquery\tuser_id\n" + "".join(f"{r[0]}\t{r[1]}\t\n" for r in rows[:n_queries]))
    rp = out / "qrels.tsv"
    rp.write_text("".join(f"{q} 0 {d} {g}\n" for q in qids for d, g in sorted(keep[q].items())))
    return Slice(cat, qp, rp, shared / "fashion", n_queries)
