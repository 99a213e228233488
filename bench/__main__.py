"""The one benchmark command (make bench): training (users vs finesweep) and evaluator, then results.md,
plot.png, meta.json and the T4 estimate in docs/benchmarks/<device>/, and the tables on stdout.

    python -m bench [--size auto|full|cpu] [--out DIR] [--skip-train] [--skip-eval]
    python -m bench --model real [--repeats 3] [--out DIR]      (make bench BENCH_ARGS="--model real")

On a CUDA machine `auto` is the full TinyLlama-1.1B architecture; on CPU the scaled-down one (bench/model.py).
`--model real`: SmolLM2-135M-Instruct (make real-model) with its own tokenizer and chat template, the lever
ladder (bench_train.LADDER: users' recipe, each lever added on top of the previous, finesweep's defaults),
every configuration `--repeats` times (default 3; the intermediate rungs `--ladder-repeats` times, default 1),
medians; results in docs/benchmarks/<device>-smollm2/ (results.md, summary.json, train.json, meta.json,
plot.png); then the evaluation part (bench/pipeline_eval.py: the shipped pipeline's first SFT and DPO trials
trained and evaluated `--repeats` times, evaluation against training, in pipeline_eval.json). `--skip-train` /
`--skip-eval` reuse train.json / pipeline_eval.json. The evaluator's old-vs-new comparison on the real model is
`python -m bench.bench_eval --compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from . import bench_eval, bench_train, pipeline_eval, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["auto", "full", "cpu"], default="auto")
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny",
                        help="tiny: TinyLlama-1.1B architecture (random init); real: SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of users + finesweep (real: 3)")
    parser.add_argument("--ladder-repeats", type=int, default=1, help="rounds of the intermediate rungs (real)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-train", action="store_true", help="reuse DIR/train.json")
    parser.add_argument("--skip-eval", action="store_true", help="reuse DIR/eval.json if present")
    args = parser.parse_args()
    out = args.out or report.default_out_dir(args.model)
    load_at_start = os.getloadavg()
    if "MAKELEVEL" in os.environ:
        command = "make bench" + (f" BENCH_ARGS='{os.environ['BENCH_ARGS']}'" if os.environ.get("BENCH_ARGS") else "")
    else:
        command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.model == "real":
        if args.skip_train:
            train = json.loads((out / "train.json").read_text())
        else:
            train = bench_train.run_real(out, args.repeats or 3, args.ladder_repeats)
        measured = json.loads((out / "meta.json").read_text()) if args.skip_train and (out / "meta.json").exists() \
            else None
        if measured is None:
            measured = report.meta(command.strip())
            measured["load_average_at_start"] = list(load_at_start)
            measured["load_average"] = list(load_at_start)
        if args.skip_eval:
            pipeline = json.loads((out / "pipeline_eval.json").read_text()) \
                if (out / "pipeline_eval.json").exists() else None
        else:
            pipeline = pipeline_eval.run(out, args.repeats or 3)
        print(report.write_real(out, train, command.strip(), info=measured, pipeline_eval=pipeline))
        print(f"bench: results in {out}/ (results.md, plot.png, train.json, pipeline_eval.json, summary.json, "
              "meta.json)")
        return
    if args.skip_train:
        train = json.loads((out / "train.json").read_text())
    else:
        train = bench_train.run_all(args.size, out)
    if args.skip_eval:
        evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    else:
        evaluation = bench_eval.run(args.size, out)
    # Re-rendering stored results keeps the measuring run's record (command, date, load) in meta.json.
    measured = None
    if args.skip_train and args.skip_eval and (out / "meta.json").exists():
        measured = json.loads((out / "meta.json").read_text())
    print(report.write(out, train, evaluation, command.strip(), info=measured))
    print(f"bench: results in {out}/ (results.md, plot.png, train.json, eval.json, meta.json)")


if __name__ == "__main__":
    main()
