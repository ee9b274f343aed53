"""The layout docs/extending.md asks of a domain: a generator in ``synth.py`` and few modules.

A domain is a package under ``domains/`` with a YAML beside it. Its generator is ``synth.py``
(plus at most one helper that only the generator needs, named in GENERATOR_HELPERS); besides
those it keeps at most MAX_MODULES modules, so that its model, data and domain-only parts read
in one sitting. A new file in a domain fails here until it is merged into the module it serves,
or the limit is raised on purpose.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = sorted(p.stem for p in (ROOT / "domains").glob("*.yaml"))
MAX_MODULES = 6
#: the one module per domain that only its generator needs (the generator's calibration or phantom)
GENERATOR_HELPERS = {"nuclei": "calibration.py", "food_cl": "calibrate.py", "radiology_vqa": "phantom.py"}


def modules(domain: str) -> list[str]:
    return sorted(p.name for p in (ROOT / "domains" / domain).glob("*.py") if p.name != "__init__.py")


def test_every_domain_yaml_has_a_package():
    assert DOMAINS, "no domains/*.yaml found"
    for domain in DOMAINS:
        assert (ROOT / "domains" / domain / "__init__.py").is_file(), f"domains/{domain}.yaml has no package domains/{domain}/"


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_layout(domain):
    names = modules(domain)
    for required in ("model.py", "data.py", "synth.py"):
        assert required in names, f"domains/{domain}/ has no {required} (see docs/extending.md)"
    helper = GENERATOR_HELPERS.get(domain)
    if helper is not None:
        assert helper in names, f"GENERATOR_HELPERS names domains/{domain}/{helper}, which does not exist"
    rest = [n for n in names if n not in ("synth.py", helper)]
    assert len(rest) <= MAX_MODULES, (
        f"domains/{domain}/ has {len(rest)} modules besides its generator ({', '.join(rest)}); at most "
        f"{MAX_MODULES}: merge a piece into the module it serves (docs/extending.md)"
    )


def test_generator_helpers_serve_only_the_generator():
    """A helper named in GENERATOR_HELPERS is imported at module level by synth.py and by no other module but itself."""
    for domain, helper in GENERATOR_HELPERS.items():
        stem = helper.removesuffix(".py")
        package = ROOT / "domains" / domain
        assert f"from .{stem} import" in (package / "synth.py").read_text(), f"domains/{domain}/synth.py does not use {helper}"
        for name in modules(domain):
            if name in ("synth.py", helper):
                continue
            top = [ln for ln in (package / name).read_text().splitlines() if ln.startswith(f"from .{stem} import")]
            assert not top, f"domains/{domain}/{name} imports {helper} at module level: it is then no generator-only helper"


def test_script_entry_points_come_last():
    """``python -m domains.<name>.<module>`` must see the whole module: a ``__main__`` block placed
    before later definitions (easy when modules are merged) runs with them undefined."""
    import ast

    for path in sorted((ROOT / "domains").glob("*/*.py")) + sorted((ROOT / "suite").rglob("*.py")):
        body = ast.parse(path.read_text()).body
        mains = [i for i, node in enumerate(body) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert all(i == len(body) - 1 for i in mains), f"{path.relative_to(ROOT)}: the `if __name__ == '__main__'` block is not its last statement"
