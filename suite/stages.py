"""Multi-stage protocols as data: a YAML list of fits, each starting from an earlier stage.

    python -m suite.stages domains/calorimetry/lifecycle.yaml

A stages file::

    root: runs/calorimetry            # each stage runs in <root>/<name>
    stages:
      - name: pretrain
        configs: [domains/calorimetry.yaml]
      - name: add_pb
        configs: [domains/calorimetry.yaml, domains/calorimetry/add_pb.yaml]
        init_from: pretrain           # -> --model.init_args.init_from <root>/pretrain/checkpoints/last.ckpt
        args: ["--trainer.max_epochs", "2"]
        test: true                    # also run `test` with the stage's last checkpoint

Each stage is one ``python -m suite fit`` (in this process), so everything a stage does can be
reproduced by hand from its saved ``config.yaml``. The model class must accept ``init_from``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from suite.cli import main as cli_main


def stage_checkpoint(root: Path, name: str) -> Path:
    return root / name / "checkpoints" / "last.ckpt"


def run_stages(spec_path: str | Path, only: list[str] | None = None, extra_args: list[str] | None = None) -> dict[str, Any]:
    """Run the stages in ``spec_path`` in order; return ``{stage: {"checkpoint", "test"}}``."""
    spec_path = Path(spec_path)
    spec = yaml.safe_load(spec_path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list):
        raise ValueError(f"{spec_path}: expected a mapping with a 'stages' list")
    root = Path(spec.get("root", "runs/stages"))
    names = [s.get("name") for s in spec["stages"]]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"{spec_path}: every stage needs a unique 'name', got {names}")
    if only and set(only) - set(names):
        raise ValueError(f"{spec_path}: --only names unknown stages {sorted(set(only) - set(names))}; stages are {names}")
    for i, stage in enumerate(spec["stages"]):  # all checked before the first (long) fit runs
        unknown = set(stage) - {"name", "configs", "init_from", "args", "test"}
        if unknown:
            raise ValueError(f"{spec_path}: stage {stage['name']!r} has unknown fields {sorted(unknown)}")
        if stage.get("init_from") and stage["init_from"] not in names[:i]:
            raise ValueError(f"{spec_path}: stage {stage['name']!r} starts from {stage['init_from']!r}, which is not an earlier stage")
    results: dict[str, Any] = {}
    for stage in spec["stages"]:
        name = stage["name"]
        ckpt = stage_checkpoint(root, name)
        if only and name not in only:
            results[name] = {"checkpoint": str(ckpt), "skipped": True}
            continue
        args = ["fit"]
        for cfg in stage.get("configs", []):
            args += ["--config", cfg]
        args += ["--trainer.default_root_dir", str(root / name)]
        if stage.get("init_from"):
            prev = stage_checkpoint(root, stage["init_from"])
            if not prev.exists():
                raise FileNotFoundError(f"stage {name!r} needs {prev}; run stage {stage['init_from']!r} first")
            args += ["--model.init_args.init_from", str(prev)]
        args += [str(a) for a in stage.get("args", [])] + list(extra_args or [])
        cli = cli_main(args)
        results[name] = {"checkpoint": str(ckpt)}
        if stage.get("test"):
            out = cli_main(["test", *args[1:], "--ckpt_path", str(ckpt)])
            results[name]["test"] = {k: float(v) for k, v in out.trainer.callback_metrics.items()}
        del cli
    summary = root / "stages.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m suite.stages", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="stages YAML")
    parser.add_argument("--only", nargs="*", help="run only these stages (earlier checkpoints must exist)")
    args, extra = parser.parse_known_args(argv)
    results = run_stages(args.spec, args.only, extra)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
