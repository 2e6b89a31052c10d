#!/usr/bin/env python3
"""Start a diffsweep sweep on the head node of a running Ray cluster.

    ray submit cluster/aws-gpu.yaml cluster/submit.py -- search_spaces/paper_fgvc.yaml \\
        --tracking-uri http://MLFLOW_HOST:5000 --num-samples 64

`ray submit` copies this file to the head node and runs it there, where the cluster's setup
commands installed diffsweep; it then runs `diffsweep run SPACE.yaml --address auto ...` in this
process, connected to that cluster. Only argparse is imported before the arguments are parsed.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="submit.py",
        description="Run `diffsweep run SPACE.yaml --address auto [FLAGS...]` on a Ray cluster's head node.",
        epilog="Example: ray submit cluster/aws-gpu.yaml cluster/submit.py -- "
               "search_spaces/paper_fgvc.yaml --tracking-uri http://10.0.0.5:5000 --num-samples 64",
    )
    p.add_argument("--chdir", metavar="DIR", default=os.environ.get("DIFFSWEEP_HOME", "~/diffsweep"),
                   help="run from DIR, so SPACE.yaml and relative paths resolve against the checkout "
                        "the launcher copied (default: $DIFFSWEEP_HOME or ~/diffsweep; skipped if absent)")
    p.add_argument("space", metavar="SPACE.yaml", help="sweep definition, e.g. search_spaces/paper_fgvc.yaml")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="FLAGS",
                   help="passed on to `diffsweep run`: --tracking-uri URI, --storage-path PATH, "
                        "--num-samples N, --seed S")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    workdir = os.path.expanduser(args.chdir)
    if os.path.isdir(workdir):
        os.chdir(workdir)
    from orchestrator.cli import main as diffsweep  # imports Ray and torch: only after parsing

    return diffsweep(["run", args.space, "--address", "auto", *args.rest])


if __name__ == "__main__":
    sys.exit(main())
