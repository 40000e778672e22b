"""`sled train …` and `sled eval …`: register(subparsers) adds them to the main `sled` parser."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    """Add `train` (cnn, drafters) and `eval` (drafters) to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="incremental training: CNN experiments, drafter ladder")
    what = train.add_subparsers(dest="train_what", required=True)

    cnn = what.add_parser("cnn", help="baseline vs incremental (random / look-ahead) on ResNet-20 and VGG-11-BN")
    cnn.add_argument("--networks", nargs="+", default=["resnet20", "vgg11"], choices=["resnet20", "vgg11"])
    cnn.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10"])
    cnn.add_argument("--cifar-dir", type=Path, help="a cifar-10-batches-py folder (for --dataset cifar10)")
    cnn.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                     help="folder of the Fashion-MNIST idx files (Debian dataset-fashion-mnist)")
    cnn.add_argument("--steps", type=int, default=1200)
    cnn.add_argument("--width", type=float, default=0.5, help="channel multiplier (1.0 = published widths)")
    cnn.add_argument("--batch-size", type=int, default=64)
    cnn.add_argument("--lr", type=float, default=2e-3)
    cnn.add_argument("--lookahead-steps", type=int, default=40)
    cnn.add_argument("--tolerance", type=float, default=0.005, help="accuracy tolerance (0.005 = 0.5 points)")
    cnn.add_argument("--test-samples", type=int, default=5000)
    cnn.add_argument("--seed", type=int, default=0)
    cnn.add_argument("--final-fraction", type=float, default=None,
                     help="share of steps for the last stage (default: equal stages)")
    cnn.add_argument("--tag", default="", help="suffix for result and plot file names")
    cnn.add_argument("--replot", action="store_true", help="only redraw plots and the table from saved runs")
    cnn.add_argument("--out", type=Path, default=Path("out/cnn"))
    cnn.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    cnn.add_argument("--threads", type=int, default=1)
    cnn.set_defaults(handler=_train_cnn)

    # Defaults reproduce the committed ladder (drafters/ladder) from seed 0.
    dr = what.add_parser("drafters", help="distil the drafter ladder for the default target")
    dr.add_argument("--target", default="smollm2")
    dr.add_argument("--data", type=Path, default=Path("out/distill"), help="distillation shards folder")
    dr.add_argument("--generate", action="store_true", help="generate (or resume) the distillation data first")
    dr.add_argument("--generate-budget-s", type=float, default=2700.0)
    dr.add_argument("--generate-shards", type=int, default=17, help="shards of 48 prompts (17 made the committed ladder)")
    dr.add_argument("--steps", type=int, default=480)
    dr.add_argument("--lookahead-steps", type=int, default=15)
    dr.add_argument("--init", choices=["lookahead", "random"], default="lookahead")
    dr.add_argument("--random-layers", action="store_true", help="trained layers from random init, not target copies")
    dr.add_argument("--stem-layers", type=int, default=6)
    dr.add_argument("--partition-layers", type=int, nargs="+", default=[2, 3, 3])
    dr.add_argument("--tokens-per-batch", type=int, default=2048)
    dr.add_argument("--lr", type=float, default=8e-4)
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--out", type=Path, default=None, help="default: drafters/ladder (the committed ladder)")
    dr.add_argument("--no-save", action="store_true")
    dr.add_argument("--summary", type=Path, default=None, help="JSON of the run (config, curves, wall time)")
    dr.add_argument("--plot", type=Path, default=None, help="PNG of the run's curves")
    dr.add_argument("--compare-init", action="store_true",
                    help="run random and look-ahead joins with these settings (nothing saved) and plot both")
    dr.add_argument("--eval-prompts", type=int, default=16, help="held-out chat and prose prompts each, for curves")
    dr.add_argument("--continuation-only", action=argparse.BooleanOptionalAction, default=True,
                    help="distil only on the target's generated positions, not on prompt positions")
    dr.add_argument("--threads", type=int, default=1)
    dr.add_argument("--kind", choices=["ladder", "feature"], default="ladder",
                    help="ladder: the incremental ladder; feature: the feature-conditioned head (drafters/feature)")
    dr.add_argument("--shards", type=int, default=None,
                    help="train on the first this many data shards (a learning-curve point; default all)")
    dr.add_argument("--epochs", type=float, default=2.0, help="feature head: passes over the data")
    dr.add_argument("--vocab", type=int, default=8192, help="feature head: draft vocabulary (most frequent target tokens)")
    dr.add_argument("--levels", type=int, default=3, help="feature head: training-time-test unroll levels")
    dr.add_argument("--feature-layers", type=int, nargs="+", default=[-1],
                    help="feature head: target hidden-state indices it is conditioned on (-1 = final norm); with "
                         "--init-from a head on one of them, the head is widened to all (training/train_feature_head.py)")
    dr.add_argument("--head-layers", type=int, default=None,
                    help="feature head: decoder layers (default 1, or the saved head's); with --init-from, more "
                         "than it has grow it, each added layer joining in front without changing its output")
    dr.add_argument("--budget-s", type=float, default=None, help="feature head: stop training after this long")
    dr.add_argument("--init-from", type=Path, default=None,
                    help="continue training this saved head or ladder (drafters/feature, drafters/ladder) on more data")
    dr.add_argument("--first-shard", type=int, default=0,
                    help="feature head: only shards numbered this or above (data a warm-started head has not seen)")
    dr.add_argument("--grow", type=int, nargs="+", default=[],
                    help="ladder with --init-from: add partitions of these many layers on top of the saved ladder, "
                         "each joining after a look-ahead window of --lookahead-steps (new rungs: large, xl)")
    dr.add_argument("--weights", choices=["int8", "int4-delta", "fp16"], default="int8",
                    help="ladder: how the saved matrices are stored (pipeline/packed_weights.py)")
    dr.add_argument("--repack", action="store_true",
                    help="ladder: write --init-from's ladder to --out in the --weights layout, no training")
    dr.set_defaults(handler=_train_drafters)

    ds = what.add_parser("datastore", help="the n-gram drafter's datastore of the target's continuations (drafters/ngram)")
    ds.add_argument("--target", default="smollm2", help="the target whose tokenizer the data's ids are in")
    ds.add_argument("--data", type=Path, nargs="+", default=[Path("out/distill")],
                    help="distillation shard folders (`sled train drafters --generate`)")
    ds.add_argument("--max-order", type=int, default=4, help="longest n-gram stored (at most 64 / bits per id)")
    ds.add_argument("--out", type=Path, default=None, help="default: drafters/ngram (the committed datastore)")
    ds.add_argument("--shards", type=int, default=None, help="only the first this many shards (a learning-curve point)")
    ds.add_argument("--note", default="", help="what the data is, kept in datastore.json")
    ds.set_defaults(handler=_train_datastore)

    ev = subparsers.add_parser("eval", help="evaluate trained artefacts")
    ev_what = ev.add_subparsers(dest="eval_what", required=True)
    ed = ev_what.add_parser("drafters", help="per rung: params, draft tokens/s, held-out greedy α at γ=4")
    ed.add_argument("--target", default="smollm2")
    ed.add_argument("--rungs", nargs="+", default=None)
    ed.add_argument("--gamma", type=int, default=4)
    ed.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    ed.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ed.add_argument("--ladder-dir", type=Path, default=None, help="a ladder folder (default: the committed drafters/ladder)")
    ed.add_argument("--feature-dir", type=Path, default=None, help="a feature head folder (default: drafters/feature)")
    ed.add_argument("--validation", type=Path, default=None,
                    help="measure on distillation shards no drafter has read (160 sequences, ~10k positions) "
                         "instead of the 48 held-out prompts (3k): for choosing between rounds")
    ed.add_argument("--datastore-dir", type=Path, default=None,
                    help="an n-gram datastore folder for the ngram+datastore and NAME+lookup+datastore+tree rungs "
                         "(default: the committed drafters/ngram)")
    ed.add_argument("--trees", action="store_true",
                    help="also the ladder rungs' token trees (NAME+tree, NAME+lookup+tree, NAME+lookup+datastore+tree: "
                         "a few minutes each); "
                         "the feature head's are always measured")
    ed.add_argument("--tree-nodes", type=int, default=None, help="the trees' size (default: the default fleet's, 16)")
    ed.add_argument("--tree-depth", type=int, default=None, help="the trees' levels (default: 6)")
    ed.add_argument("--tree-branch", type=int, default=None,
                    help="how many likeliest paths each level expands, each with as many children (default: 3)")
    ed.set_defaults(handler=_eval_drafters)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _train_cnn(args: argparse.Namespace) -> int:
    from training.train_cnn import replot, train_cnns

    _threads(args.threads)
    if args.replot:
        replot(networks=tuple(args.networks), dataset=args.dataset, tag=args.tag, tolerance=args.tolerance,
               out=args.out, img_dir=args.img_dir, title=f"({args.steps} steps of {args.batch_size})")
        return 0
    train_cnns(networks=tuple(args.networks), dataset=args.dataset, cifar_dir=args.cifar_dir,
               fashion_dir=args.fashion_dir, steps=args.steps,
               width=args.width, batch_size=args.batch_size, lr=args.lr, lookahead_steps=args.lookahead_steps,
               tolerance=args.tolerance, test_samples=args.test_samples, seed=args.seed, out=args.out,
               final_fraction=args.final_fraction, tag=args.tag,
               img_dir=args.img_dir)
    return 0


def _train_drafters(args: argparse.Namespace) -> int:
    from training.distill_data import generate_shards
    from training.drafter_net import RUNG_NAMES, LadderSpec
    from training.plots import plot_runs
    from training.train_drafters import LADDER_DIR, train_ladder

    _threads(args.threads)
    if args.generate:
        generate_shards(args.data, target=args.target, time_budget_s=args.generate_budget_s,
                        max_shards=args.generate_shards, seed=args.seed)
    if args.kind == "feature":
        from training.train_feature_head import train_head
        from workers.feature_head import FEATURE_DIR

        summary = train_head(args.data, args.out or FEATURE_DIR, target=args.target,
                             feature_layers=tuple(args.feature_layers), vocab=args.vocab, max_shards=args.shards,
                             epochs=args.epochs, lr=args.lr, levels=args.levels, seed=args.seed,
                             save=not args.no_save, time_budget_s=args.budget_s, init_from=args.init_from,
                             first_shard=args.first_shard, head_layers=args.head_layers)
        if args.summary:
            args.summary.write_text(json.dumps(summary) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
        return 0
    if args.repack:
        from training.train_drafters import repack_ladder

        if args.init_from is None or args.out is None:
            raise SystemExit("--repack needs --init-from (the ladder to read) and --out")
        print(repack_ladder(args.init_from, args.out, args.weights, args.target))
        return 0
    spec = LadderSpec(stem_layers=args.stem_layers, partition_layers=tuple(args.partition_layers),
                      rungs=RUNG_NAMES[: len(args.partition_layers)])
    common = dict(spec=spec, target=args.target, steps=args.steps, init_from_target=not args.random_layers,
                  lookahead_steps=args.lookahead_steps, tokens_per_batch=args.tokens_per_batch, lr=args.lr,
                  eval_prompts=args.eval_prompts, seed=args.seed,
                  continuation_only=args.continuation_only, max_shards=args.shards, init_from=args.init_from,
                  grow=tuple(args.grow), weights=args.weights)
    out = args.out or LADDER_DIR
    if args.compare_init:
        runs = {init: train_ladder(args.data, out, init=init, save=False, name=f"drafters/{init}", **common)
                for init in ("random", "lookahead")}
        summary = {init: {k: v for k, v in run.items()} for init, run in runs.items()}
        if args.plot:
            plot_runs({f"incremental-{i}": r["history"] for i, r in runs.items()}, args.plot,
                      f"drafter partitions {list(spec.partition_layers)} on a {spec.stem_layers}-layer target stem",
                      metric_label="held-out α")
        if args.summary:
            args.summary.write_text(json.dumps(summary) + "\n")
        for init, run in runs.items():
            print(init, json.dumps(run["history"]["evals"][-1]["rungs"]))
        return 0
    summary = train_ladder(args.data, out, init=args.init, save=not args.no_save, name=f"drafters/{args.init}", **common)
    if args.summary:
        args.summary.write_text(json.dumps(summary) + "\n")
    if args.plot:
        plot_runs({args.init: summary["history"]}, args.plot, "drafter ladder", metric_label="held-out α")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def _train_datastore(args: argparse.Namespace) -> int:
    from training.distill_dataset import shard_sequences
    from pipeline.models import vocab_size
    from workers.datastore import DATASTORE_DIR, build_datastore

    started = time.perf_counter()
    sources = [str(folder) for folder in args.data]
    store = build_datastore(shard_sequences(args.data, args.shards), vocab_size(args.target), args.max_order,
                            meta={"target": args.target, "data": sources, **({"note": args.note} if args.note else {})})
    out = args.out or DATASTORE_DIR
    store.save(out)
    print(json.dumps({**store.meta, "out": str(out), "bytes": (out / "datastore.npz").stat().st_size,
                      "wall_s": round(time.perf_counter() - started, 1)}, indent=2))
    return 0


def _eval_drafters(args: argparse.Namespace) -> int:
    from training.eval_drafters import evaluate_ladder
    from workers.token_tree import TreeShape

    _threads(args.threads)
    shape = {k: v for k, v in (("nodes", args.tree_nodes), ("depth", args.tree_depth), ("branch", args.tree_branch))
             if v is not None}
    report = evaluate_ladder(args.target, args.rungs, args.gamma, feature_dir=args.feature_dir,
                             ladder_dir=args.ladder_dir, model_trees=args.trees, datastore_dir=args.datastore_dir,
                             validation=args.validation, tree=TreeShape(**shape))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"target {report['target']}: {report['target_tokens_per_s']} tokens/s, γ={report['gamma']}")
        for r in report["rungs"]:
            print(f"{r['name']:>10}  layers {r['layers']:>2}  params {r['params'] / 1e6:6.1f}M  "
                  f"α {r['alpha']:.3f}  accepted/round {r['mean_accepted_per_round']:.2f}  "
                  f"{r['draft_tokens_per_s']:.1f} tokens/s")
    return 0
