"""Installed size of cardpipe per extra: site-packages of a fresh venv after a non-editable install.

    python3 bench/install_sizes.py [--configs base,mysql,spark,mysql-spark,fast] [--keep]

For each configuration (``base`` = ``cardpipe`` without extra, ``mysql`` = ``cardpipe[mysql]``, ``spark``,
``mysql-spark`` = ``cardpipe[mysql,spark]``, ``fast`` = ``cardpipe[fast]``):
``python3 -m venv bench/out/install-sizes/<name>``, then that venv's ``pip install "<project>[extra]"`` (not
editable: a wheel is built and installed). The project is a copy of /work/main's pyproject.toml, README.md and
cardpipe/ under bench/out/install-sizes/src, so that the build (setuptools' ``build/`` and ``*.egg-info``) leaves
the project's tree untouched; the wheel is the same.
pip runs with the machine's pip configuration (index, constraints, its wheel cache: a cached wheel does not
change what is installed).

Measured per venv: ``du -sk`` of site-packages (MB = KiB / 1024), the distributions installed (``*.dist-info``
folders, pip and setuptools of the fresh venv included; the ``empty`` row is a venv with nothing installed),
and the five largest distributions: the disk usage (blocks, as du counts) of the files their RECORD lists
inside site-packages, their ``.pyc`` files included. The venv is deleted after measuring unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import shutil
import subprocess
import sys
import time
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from common import OUT_DIR, ROOT, fresh_dir, load_average, machine, print_table, say, write_json

CONFIGS = {
    "empty": None,
    "base": "",
    "mysql": "[mysql]",
    "spark": "[spark]",
    "mysql-spark": "[mysql,spark]",
    "fast": "[fast]",
}
WORK = OUT_DIR / "install-sizes"
#: What the wheel is built from (copied): setuptools reads pyproject.toml, the readme and the package.
PROJECT_FILES = ("pyproject.toml", "README.md", "cardpipe")


def project_copy() -> Path:
    src = fresh_dir(WORK / "src")
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    return src


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if len(found) != 1:
        raise RuntimeError(f"{venv}: expected one site-packages, found {found}")
    return found[0]


def du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True).stdout
    return round(int(out.split()[0]) / 1024, 1)


def distributions(site: Path) -> list[dict[str, Any]]:
    """Each distribution: name, version, MB on disk of its RECORD's files inside site-packages."""
    dists = []
    for info in sorted(site.glob("*.dist-info")):
        meta = HeaderParser().parsestr((info / "METADATA").read_text(encoding="utf-8", errors="replace"))
        blocks, files = 0, 0
        record = info / "RECORD"
        if record.is_file():
            with record.open(newline="", encoding="utf-8") as handle:
                for row in csv.reader(handle):
                    if not row:
                        continue
                    path = (site / row[0]).resolve()
                    if not path.is_relative_to(site) or not path.is_file():
                        continue
                    blocks += path.stat().st_blocks
                    files += 1
        dists.append(
            {"name": meta["Name"], "version": meta["Version"], "mb": round(blocks * 512 / 2**20, 1), "files": files}
        )
    return sorted(dists, key=lambda d: -d["mb"])


def measure(name: str, extra: str | None, src: Path, keep: bool) -> dict[str, Any]:
    venv = WORK / name
    shutil.rmtree(venv, ignore_errors=True)
    result: dict[str, Any] = {"config": name, "load_average_before": load_average()}
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if extra is not None:
            requirement = f"{src}{extra}"
            result["requirement"] = f"cardpipe{extra} from {requirement}"
            say(f"{name}: pip install '{requirement}'")
            started = time.perf_counter()
            proc = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", requirement],
                capture_output=True,
                text=True,
            )
            result["install_seconds"] = round(time.perf_counter() - started, 1)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: pip install failed:\n{proc.stderr[-3000:]}")
        site = site_packages(venv)
        dists = distributions(site)
        result.update(
            {
                "site_packages_mb": du_mb(site),
                "distributions": len(dists),
                "top5": dists[:5],
                "all": dists,
                "python": site.parent.name,
            }
        )
    finally:
        if not keep:
            shutil.rmtree(venv, ignore_errors=True)
    result["load_average_after"] = load_average()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--keep", action="store_true", help="keep the venvs under bench/out/install-sizes")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "install_sizes.json")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: choose of {', '.join(CONFIGS)}")

    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    src = project_copy()
    results = [measure(name, CONFIGS[name], src, args.keep) for name in names]
    report["results"] = results
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        with contextlib.suppress(OSError):
            WORK.rmdir()  # only when empty
    empty = next((r for r in results if r["config"] == "empty"), None)
    print_table(
        "Installed size per configuration (site-packages of a fresh venv, du)",
        ["config", "site-packages MB", "over empty venv MB", "distributions", "install s"],
        [
            [
                r["config"],
                r["site_packages_mb"],
                round(r["site_packages_mb"] - empty["site_packages_mb"], 1) if empty else None,
                r["distributions"],
                r.get("install_seconds"),
            ]
            for r in results
        ],
    )
    print_table(
        "The five largest distributions (MB on disk of their files)",
        ["config", "1", "2", "3", "4", "5"],
        [
            [r["config"], *(f"{d['name']} {d['mb']:.1f}" for d in r["top5"])] + [""] * (5 - len(r["top5"]))
            for r in results
        ],
    )
    report["load_average_at_end"] = load_average()
    write_json(args.out, report)


if __name__ == "__main__":
    main()
