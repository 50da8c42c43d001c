"""Architecture and capacity, chosen by the leave-one-source-out protocol (issue 10, item 4).

    python benchmarks/architecture_sweep.py --out build/sweep

Trains every architecture with the same recipe and the same budget (synthetic subjects only,
so every bundled real source is held out from every model), then scores all of them with
``benchmarks/generalisation.py`` on the same planted pairs. Each training resumes from its
last finished epoch, so an interrupted sweep continues where it stopped. The budget is smaller
than the shipped default's recipe (see RESULTS.md): the sweep ranks options, it does not ship one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deepssim.embedding.model import DeepSSIM
from deepssim.hardware import cpu_description
from deepssim.training.train import TrainSettings, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalisation import run  # noqa: E402

ARCHITECTURES = ("deepssim_fast", "deepssim_spatial", "deepssim_wide", "convnext_tiny_gem")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--synthetic-subjects", type=int, default=160)
    parser.add_argument("--n-pairs", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="build/sweep")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"CPU: {cpu_description()}; torch threads: {torch.get_num_threads()}", flush=True)
    seconds = {}
    for architecture in args.architectures:
        settings = TrainSettings(
            architecture=architecture,
            epochs=args.epochs,
            n_pairs=args.n_pairs,
            precision=args.precision,
            synthetic_subjects=args.synthetic_subjects,
            seed=args.seed,
        )
        started = time.perf_counter()
        result = train(None, out / architecture, settings)
        seconds[architecture] = result.summary.get("training_seconds", round(time.perf_counter() - started))
        print(f"{architecture}: trained in {seconds[architecture]} s", flush=True)
    models = {a: DeepSSIM.load(out / a / "best.safetensors") for a in args.architectures}
    models["shipped-default"] = DeepSSIM.load("default")  # the same data, a 7x larger budget
    summary = run(models, out / "generalisation", per_class=30, queries=30, seed=args.seed)
    summary["training_seconds"] = seconds
    summary["recipe"] = vars(args)
    (out / "generalisation" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print((out / "generalisation" / "results.md").read_text())


if __name__ == "__main__":
    main()
