"""Multi-stage protocols as data: a list of fits, each starting from an earlier stage.

Two ways to write them. Inside a domain YAML (a bare ``python -m suite fit --config <yaml>`` runs
them all, and ``test`` / ``predict`` / ``validate`` run on the last stage)::

    stages:
      - name: projector
        args: ["--model.init_args.stage", "projector"]
      - name: lora
        init_from: projector       # -> --model.init_args.init_from <root>/projector/checkpoints/last.ckpt
        args: ["--model.init_args.stage", "lora"]
        test: true                 # also run `test` on the stage's last checkpoint
      # one entry can stand for T stages (T an int or a key of the resolved config):
      - {name: "task{i}", repeat: data.init_args.num_tasks, init_from: previous, args: ["--data.init_args.task", "{i}"]}

Every stage is one fit of that same YAML (with the command line's overrides, then the stage's own
``configs`` and ``args``, which win), run in ``<trainer.default_root_dir>/<name>``. Or as a
stand-alone file for ``python -m suite.stages domains/calorimetry/lifecycle.yaml``::

    root: runs/calorimetry            # each stage runs in <root>/<name>
    stages:
      - name: pretrain
        configs: [domains/calorimetry.yaml]
      - name: add_pb
        configs: [domains/calorimetry.yaml, domains/calorimetry/add_pb.yaml]
        init_from: pretrain
        test: true

A finished stage is skipped when the protocol runs again, and an interrupted one resumes from its
``last.ckpt``, so a long protocol (continual tasks) survives a kill between or inside stages.
Every stage is an ordinary ``python -m suite fit`` (in this process): its saved ``config.yaml``
reproduces it by hand. The model class takes ``init_from`` (an :class:`~suite.module.AdaptedModule`
argument).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

STAGE_FIELDS = {"name", "configs", "init_from", "args", "test", "repeat"}
DONE = "stage.done"  # written into a stage's folder when its fit (and test) finished


def stage_checkpoint(root: Path, name: str) -> Path:
    return root / name / "checkpoints" / "last.ckpt"


def expand_stages(stages: list[dict[str, Any]], config: Any = None, where: str = "stages") -> list[dict[str, Any]]:
    """Check every stage entry and expand ``repeat`` entries; ``init_from: previous`` names the stage before."""
    out: list[dict[str, Any]] = []
    for entry in stages:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ValueError(f"{where}: every stage needs a 'name', got {entry!r}")
        unknown = set(entry) - STAGE_FIELDS
        if unknown:
            raise ValueError(f"{where}: stage {entry['name']!r} has unknown fields {sorted(unknown)}; known: {sorted(STAGE_FIELDS)}")
        repeat = entry.get("repeat")
        if repeat is None:
            items = [dict(entry)]
        else:
            count = repeat if isinstance(repeat, int) else (config.get(repeat) if config is not None else None)
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"{where}: stage {entry['name']!r} repeats {repeat!r} times, which is not a positive count")
            items = [{k: _fill(v, i) for k, v in entry.items() if k != "repeat"} for i in range(count)]
        for item in items:
            if item.get("init_from") == "previous":
                if not out:
                    raise ValueError(f"{where}: stage {item['name']!r} starts from 'previous' but is the first stage")
                item["init_from"] = out[-1]["name"]
            out.append(item)
    names = [s["name"] for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: stage names must be unique, got {names}")
    for i, stage in enumerate(out):
        if stage.get("init_from") and stage["init_from"] not in names[:i]:
            raise ValueError(f"{where}: stage {stage['name']!r} starts from {stage['init_from']!r}, which is not an earlier stage")
    return out


def _fill(value: Any, i: int) -> Any:
    if isinstance(value, str):
        return value.replace("{i}", str(i))
    if isinstance(value, list):
        return [_fill(v, i) for v in value]
    return value


def _stage_args(stage: dict[str, Any], root: Path) -> list[str]:
    args: list[str] = []
    for cfg in stage.get("configs") or []:
        args += ["--config", str(cfg)]
    args += ["--trainer.default_root_dir", str(root / stage["name"])]
    if stage.get("init_from"):
        prev = stage_checkpoint(root, stage["init_from"])
        if not prev.exists():
            raise FileNotFoundError(f"stage {stage['name']!r} needs {prev}; run stage {stage['init_from']!r} first")
        args += ["--model.init_args.init_from", str(prev)]
    return args + [str(a) for a in stage.get("args") or []]


def _run(stages: list[dict[str, Any]], root: Path, base: list[str], only: list[str] | None = None) -> dict[str, Any]:
    """Fit (and test) each stage in order after ``base`` args; skip finished ones, resume interrupted ones."""
    from suite.cli import main as cli_main

    results: dict[str, Any] = {}
    last_cli = None
    for stage in stages:
        name = stage["name"]
        ckpt = stage_checkpoint(root, name)
        if only and name not in only:
            results[name] = {"checkpoint": str(ckpt), "skipped": True}
            continue
        done = root / name / DONE
        if done.exists() and ckpt.exists() and not only:
            print(f"[suite.stages] stage {name!r} already finished ({ckpt}); delete {root / name} to run it again")
            results[name] = json.loads(done.read_text())
            continue
        args = [*base, *_stage_args(stage, root)]
        resume = ["--ckpt_path", str(ckpt)] if ckpt.exists() and not only else []
        if resume:
            print(f"[suite.stages] stage {name!r} was interrupted; resuming from {ckpt}")
        last_cli = cli_main(["fit", *args, *resume])
        results[name] = {"checkpoint": str(ckpt)}
        if stage.get("test"):
            out = cli_main(["test", *args, "--ckpt_path", str(ckpt)])
            results[name]["test"] = {k: float(v) for k, v in out.trainer.callback_metrics.items()}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(results[name], indent=2))
    summary = root / "stages.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(results, indent=2))
    return {"stages": results, "last_cli": last_cli}


def run_stages(spec_path: str | Path, only: list[str] | None = None, extra_args: list[str] | None = None,
               root: str | Path | None = None) -> dict[str, Any]:
    """Run the stages of a stand-alone stages file in order; return ``{stage: {"checkpoint", "test"}}``.
    ``root`` (default: the file's ``root``) is the folder the stages run in."""
    spec_path = Path(spec_path)
    spec = yaml.safe_load(spec_path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list):
        raise ValueError(f"{spec_path}: expected a mapping with a 'stages' list")
    stages = expand_stages(spec["stages"], where=str(spec_path))  # all checked before the first (long) fit runs
    names = [s["name"] for s in stages]
    if only and set(only) - set(names):
        raise ValueError(f"{spec_path}: --only names unknown stages {sorted(set(only) - set(names))}; stages are {names}")
    root = Path(root if root is not None else spec.get("root", "runs/stages"))
    # the stand-alone file's stages carry their own configs; the command line's extras go last
    stages = [{**s, "args": [*(s.get("args") or []), *(extra_args or [])]} for s in stages]
    return _run(stages, root, [], only)["stages"]


def _strip(argv: list[str], subcommand: str) -> tuple[list[str], str | None]:
    """``argv`` without the subcommand and ``--ckpt_path``; the ``--ckpt_path`` value given, if any."""
    args = list(argv)
    if subcommand in args:
        args.remove(subcommand)
    ckpt = None
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--ckpt_path" and i + 1 < len(args):
            ckpt, i = args[i + 1], i + 2
            continue
        if a.startswith("--ckpt_path="):
            ckpt = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, ckpt


def plan_config_stages(subcommand: str, argv: list[str], config: Any) -> tuple[list[dict[str, Any]], Path, list[str], str | None]:
    """Check the ``stages`` of a parsed config before anything runs: ``(stages, root, base args, ckpt)``.

    Raises ``ValueError`` / ``FileNotFoundError`` naming the problem (the CLI turns them into usage errors).
    """
    stages = expand_stages(config.get("stages"), config)
    root = Path(config.trainer.default_root_dir or ".")
    base, ckpt = _strip(argv, subcommand)
    base += ["--stages", "null"]  # a stage is one plain fit of this config
    if subcommand == "fit" and ckpt is not None:
        raise ValueError("fit with stages resumes by itself (finished stages are skipped, an interrupted one resumes): drop --ckpt_path")
    if subcommand != "fit" and ckpt in (None, "last"):
        ckpt = str(stage_checkpoint(root, stages[-1]["name"]))
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"{subcommand}: the last stage {stages[-1]['name']!r} has no checkpoint {ckpt}; run fit first")
    return stages, root, base, ckpt


def run_config_stages(subcommand: str, argv: list[str], config: Any) -> dict[str, Any]:
    """The ``stages`` of a parsed config: ``fit`` runs them all; another subcommand runs on the last stage."""
    from suite.cli import main as cli_main

    stages, root, base, ckpt = plan_config_stages(subcommand, argv, config)
    if subcommand == "fit":
        return _run(stages, root, base)
    last = stages[-1]
    cli = cli_main([subcommand, *base, *_stage_args(last, root), "--ckpt_path", ckpt])
    return {"stages": {last["name"]: {"checkpoint": ckpt}}, "last_cli": cli}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m suite.stages", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="stages YAML")
    parser.add_argument("--only", nargs="*", help="run only these stages (earlier checkpoints must exist)")
    parser.add_argument("--root", help="run the stages in this folder instead of the file's root")
    args, extra = parser.parse_known_args(argv)
    results = run_stages(args.spec, args.only, extra, root=args.root)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
