"""Regenerate the committed notebooks with their outputs, and the README's figure per domain.

    python notebooks/refresh.py                 # every notebook (runs each domain's default YAML first)
    python notebooks/refresh.py nuclei dialogue # some of them
    python notebooks/refresh.py --reuse         # keep runs that already exist under runs/notebooks/

Each notebook says in its metadata what it reads (``metadata.suite``)::

    {"env": "NUCLEI_RUN",                                    # the variable the notebook reads its run folder from
     "commands": [["fit", "--config", "domains/nuclei.yaml"],  # python -m suite <command> --trainer.default_root_dir {run}
                  ["predict", "--config", "domains/nuclei.yaml", "--ckpt_path", "last"]],
     "figure": 1}

A command that starts with ``-m`` runs that module instead of ``python -m suite`` (a stages file:
``["-m", "suite.stages", "domains/calorimetry/lifecycle.yaml", "--root", "{run}"]``).                                            # which image output (0-based) becomes docs/figures/<name>.png

The commands run with ``--trainer.default_root_dir runs/notebooks/<name>`` (``{run}`` in a command
is replaced by that folder), the notebook then executes in a fresh kernel with the variable set,
and its outputs are written back into ``notebooks/<name>.ipynb``. The chosen figure is saved as a
PNG of at most ~200 KB. Budget: the default runs of all domains, ~30 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
MAX_FIGURE_BYTES = 200_000
#: the kernel's matplotlib backend: figures become image outputs (Agg would draw them nowhere)
INLINE = "module://matplotlib_inline.backend_inline"


def notebook_meta(nb) -> dict:
    meta = nb.metadata.get("suite")
    if not meta or "env" not in meta or "commands" not in meta:
        raise ValueError("the notebook's metadata has no 'suite' entry with 'env' and 'commands' (see notebooks/refresh.py)")
    return meta


def run_commands(meta: dict, run: Path) -> None:
    for command in meta["commands"]:
        args = [str(a).replace("{run}", str(run)) for a in command]
        if args[0] == "-m":  # another entry point, e.g. ["-m", "suite.stages", "<stages.yaml>", "--root", "{run}"]
            print(f"[refresh] python {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
            continue
        if "--trainer.default_root_dir" not in args:
            args += ["--trainer.default_root_dir", str(run)]
        print(f"[refresh] python -m suite {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "suite", *args], cwd=ROOT, check=True)


def images(nb) -> list[bytes]:
    """PNG outputs of an executed notebook, in order."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "image/png" in data:
                out.append(base64.b64decode(data["image/png"]))
    return out


def small_png(png: bytes, limit: int = MAX_FIGURE_BYTES) -> bytes:
    """The PNG, downscaled until it fits ``limit`` bytes (README figures stay light)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        if buf.tell() <= limit or min(image.size) < 200:
            return buf.getvalue()
        image = image.resize((int(image.width * 0.8), int(image.height * 0.8)))


def prepare_run(meta: dict, run: Path, reuse: bool = False) -> None:
    """Run the notebook's commands into ``run``, starting from an empty folder. An earlier run's files
    would otherwise stay beside the new ones: Lightning writes ``last-v1.ckpt`` next to the old
    ``last.ckpt``, and the old log versions stay for the notebook to find. With ``reuse`` an existing
    run is kept as it is."""
    if reuse and run.exists():
        return
    shutil.rmtree(run, ignore_errors=True)
    run_commands(meta, run)


def refresh(name: str, reuse: bool = False, timeout: int = 1800) -> Path:
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    meta = notebook_meta(nb)
    run = ROOT / "runs" / "notebooks" / name
    prepare_run(meta, run, reuse)
    env = {meta["env"]: str(run), "MPLBACKEND": INLINE}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    nbformat.write(nb, path)
    pngs = images(nb)
    if pngs:
        FIGURES.mkdir(parents=True, exist_ok=True)
        (FIGURES / f"{name}.png").write_bytes(small_png(pngs[min(int(meta.get("figure", 0)), len(pngs) - 1)]))
    print(f"[refresh] {path.relative_to(ROOT)}: {len(pngs)} figures", flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to refresh (default: all)")
    parser.add_argument("--reuse", action="store_true", help="keep existing runs under runs/notebooks/")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in names:
        refresh(name, args.reuse)


if __name__ == "__main__":
    main()
