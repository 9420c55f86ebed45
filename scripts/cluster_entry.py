"""Run a ULRec stage on the Ray cluster this machine belongs to (the head node of `cluster.yaml`).

    ray submit cluster.yaml scripts/cluster_entry.py -- --config configs/steam.yaml [overrides...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python scripts/cluster_entry.py --config configs/steam.yaml [overrides...]

Runs ``ulrec <stage> --config CONFIG ray.address=auto [overrides...]`` (stage ``run`` = the whole
pipeline; ``--stage serve``, ``--stage "train kto"``, ... for one stage) from the repository
directory, so relative config paths work both ways: `ray submit` copies only this file to the
head node's home directory and runs it there, while the repository is mounted at ~/ulrec
(ULREC_HOME overrides); `ray job submit --working-dir .` runs it inside an uploaded copy.
Exits with the CLI's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_HOME = "~/ulrec"


def repository_dir() -> Path:
    """ULREC_HOME, else the checkout this file sits in, else ~/ulrec (where cluster.yaml mounts it)."""
    if os.environ.get("ULREC_HOME"):
        return Path(os.environ["ULREC_HOME"]).expanduser()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "ulrec").is_dir():
        return here
    return Path(DEFAULT_HOME).expanduser()


def cli_args(argv: list[str]) -> list[str]:
    """The ``ulrec`` arguments for this script's arguments (the cluster address comes first, so an
    explicit ``ray.address=...`` override still wins)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True, help="YAML config, relative to the repository")
    parser.add_argument("--stage", default="run", help='ulrec subcommand, e.g. "run", "serve", "train kto"')
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_users=2000")
    args = parser.parse_args(argv)
    return [*args.stage.split(), "--config", args.config, "ray.address=auto", *args.overrides]


def main(argv: list[str] | None = None) -> int:
    ulrec_args = cli_args(sys.argv[1:] if argv is None else argv)
    home = repository_dir()
    if not home.is_dir():
        print(f"cluster_entry: error: repository not found at {home} (set ULREC_HOME)", file=sys.stderr)
        return 1
    os.chdir(home)
    sys.path.insert(0, str(home))
    from ulrec.cli import main as ulrec_main

    print(f"cluster_entry: ulrec {' '.join(ulrec_args)} (in {home})", flush=True)
    return ulrec_main(ulrec_args)


if __name__ == "__main__":
    sys.exit(main())
