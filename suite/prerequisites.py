"""Prerequisites: fits a run needs before its model is built, run once and cached by their resolved config.

A model that starts from a backbone pretrained here (no weights can be downloaded) declares the
pretraining run in its YAML instead of running a fit inside its constructor::

    prerequisites:
      - name: foundation                              # the placeholder value
        configs: [domains/pointcloud/pretrain.yaml]    # the prerequisite's own fit
        into: model.init_args.init_from               # this run's key; replaced while it holds "foundation"
        link: {model.init_args.encoder: model.init_args.encoder}   # prerequisite key: this run's key
        product: checkpoints/last.ckpt                # file of the prerequisite run to put into `into`

``python -m suite <subcommand>`` resolves them before any class is built (:func:`resolve`): the
prerequisite's config is parsed with the same CLI (defaults and links included), the resolved
config is hashed, and its fit runs once, in this process, into
``data/generated/prerequisites/<name>-<hash>/``; later runs with the same resolved config reuse that
folder. A user who gives a real value in ``into`` (a checkpoint path) skips the prerequisite.
The global RNG state is restored afterwards, so a run that had to build its prerequisite continues
exactly like one that found it cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from suite.checkpoint import rng_states, set_rng_states
from suite.data import cached, generated_dir

#: keys of a resolved config that say where a run writes, not what it computes
_WHERE_KEYS = ("config", "trainer.default_root_dir", "checkpoint.dirpath", "trainer.logger", "prerequisites")


@dataclass
class Prerequisite:
    """A fit that must have run before this run's model is built (see the module docstring).

    Args:
        name: the placeholder that ``into`` holds until the prerequisite is resolved.
        configs: YAML files of the prerequisite's fit, composed in order.
        into: dotted key of this run's config that receives the product's path.
        link: prerequisite key -> this run's key; the value is passed to the prerequisite, so
            both use the same setting (e.g. the encoder shape) and it is stated once.
        args: further command-line arguments of the prerequisite's fit.
        product: path, inside the prerequisite's run folder, of what ``into`` receives.
    """

    name: str
    configs: list[str]
    into: str
    link: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    product: str = "checkpoints/last.ckpt"


def _as_plain(value: Any) -> Any:
    """A config value as plain JSON-able data (jsonargparse Namespaces become dicts)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def config_path(path: str) -> Path:
    """A config file named relative to the working directory or, failing that, to the project root
    (so ``domains/...`` paths in a YAML work from anywhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parent.parent / p
    return root if root.exists() else p


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b.c": v}`` -> ``{"a": {"b": {"c": v}}}`` (a config file, so YAML types survive: null, lists)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _as_plain(value)
    return out


@contextlib.contextmanager
def fit_args(prereq: Prerequisite, values: dict[str, Any] | None = None) -> Iterator[list[str]]:
    """The command line (after ``fit``) of the prerequisite's run; the linked values go in a
    temporary config composed last (removed on exit)."""
    args: list[str] = []
    for cfg in prereq.configs:
        args += ["--config", str(config_path(cfg))]
    with tempfile.TemporaryDirectory(prefix="suite-prereq-") as tmp:
        if values:
            linked = Path(tmp) / "linked.yaml"
            linked.write_text(yaml.safe_dump(_nested(values), sort_keys=True))
            args += ["--config", str(linked)]
        yield args + [str(a) for a in prereq.args]


def resolved_config(args: list[str]) -> dict[str, Any]:
    """The fully resolved config (class defaults and links included) of ``fit <args>``, without
    building any class; the keys that only say where the run writes are left out."""
    from suite.cli import parse_only

    states = rng_states()
    try:
        config = parse_only(["fit", *args])
    finally:
        set_rng_states(states)
    for key in _WHERE_KEYS:
        parent, _, leaf = key.rpartition(".")
        holder = config
        for part in parent.split(".") if parent else []:
            holder = holder.get(part, {}) if isinstance(holder, dict) else {}
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return config


def _stable(value: Any) -> Any:
    """JSON-able, run-independent text for values a resolved config may hold (class defaults such as functions)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return str(value)


def _folder(prereq: Prerequisite, args: list[str]) -> Path:
    text = json.dumps(resolved_config(args), sort_keys=True, default=_stable)
    key = hashlib.sha256((text + prereq.product).encode()).hexdigest()[:12]
    return generated_dir("prerequisites") / f"{prereq.name}-{key}"


def cache_folder(prereq: Prerequisite, values: dict[str, Any] | None = None) -> Path:
    """``data/generated/prerequisites/<name>-<hash of the resolved config>``."""
    with fit_args(prereq, values) as args:
        return _folder(prereq, args)


def run_prerequisite(prereq: Prerequisite, values: dict[str, Any] | None = None) -> Path:
    """Path of ``prereq``'s product, running its fit first if no run of the same resolved config is cached."""
    with fit_args(prereq, values) as args:
        folder = _folder(prereq, args)

        def build(tmp: Path) -> None:
            from suite.cli import main as cli_main

            print(f"[suite] prerequisite {prereq.name!r} ({', '.join(prereq.configs)}) is not cached; running it once into {folder}")
            states = rng_states()
            try:
                cli_main(["fit", *args, "--trainer.default_root_dir", str(tmp)])
            finally:
                set_rng_states(states)
            if not (tmp / prereq.product).exists():
                raise FileNotFoundError(f"prerequisite {prereq.name!r} finished but wrote no {prereq.product} (looked in {tmp})")
            record = {"name": prereq.name, "configs": prereq.configs, "linked": _nested(values or {}), "args": prereq.args}
            (tmp / "prerequisite.json").write_text(json.dumps(record, indent=2))

        product = cached(folder, build) / prereq.product
    if not product.exists():
        raise FileNotFoundError(f"the cached prerequisite {folder} has no {prereq.product}; remove the folder to rebuild it")
    return product


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dotted key, in a jsonargparse Namespace or a plain nested dict."""
    if not isinstance(config, dict):
        return config.get(key, default)
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(config: Any, key: str, value: Any) -> None:
    if not isinstance(config, dict):
        config[key] = value
        return
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


_MISSING = object()


def linked_values(config: Any, prereq: Prerequisite) -> dict[str, Any]:
    """``{prerequisite key: value}`` of ``prereq.link`` read from this run's ``config``."""
    values = {}
    for theirs, ours in prereq.link.items():
        value = _get(config, ours, _MISSING)
        if value is _MISSING and isinstance(config, dict):
            continue  # a YAML that does not state it: both sides keep their class default
        if value is _MISSING:
            raise KeyError(f"prerequisite {prereq.name!r} links {theirs} to {ours!r}, which this config does not have")
        values[theirs] = value
    return values


def resolve(config: Any, prerequisites: list[Prerequisite | dict[str, Any]] | None = None) -> dict[str, str]:
    """Replace every placeholder in ``config`` by its prerequisite's product.

    ``config`` is a parsed jsonargparse Namespace (the CLI) or a plain dict of a YAML (benchmarks,
    notebooks); ``prerequisites`` default to the config's own. Returns ``{key: path}`` for the
    keys that were replaced (empty when the user gave real values).
    """
    if prerequisites is None:
        prerequisites = _get(config, "prerequisites") or []
    done: dict[str, str] = {}
    for p in prerequisites:
        prereq = p if isinstance(p, Prerequisite) else Prerequisite(**_as_plain(p))
        if _get(config, prereq.into) != prereq.name:
            continue  # a real value was given: nothing to build
        done[prereq.into] = str(run_prerequisite(prereq, linked_values(config, prereq)))
        _set(config, prereq.into, done[prereq.into])
    return done
