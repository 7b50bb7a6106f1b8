"""Locate model folders and data files: a local path, or a file shipped inside an installed package."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.config import DataFile, SourceConfig
from pipeline.data import Dataset
from pipeline.finetune import finetuned_folder
from pipeline.progress import step
from pipeline.split_zip import split_zip_folder
from serve.config import ConfigError, resolve


def package_root(package: str, config_path: Path, field: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{config_path}: field '{field}': package {package!r} is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(package: str) -> str | None:
    top = package.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        return f"{dist}=={importlib.metadata.version(dist)}"
    return None


def install_missing(requirements: list[str], config_path: Path) -> None:
    """Install the pinned distributions a source is read from that this environment lacks, with pip and
    without their dependencies (a model package's own metadata may ask for another torch)."""
    missing = []
    for requirement in requirements:
        name, version = requirement.split("==")
        try:
            if importlib.metadata.version(name) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        missing.append(requirement)
    if not missing:
        return
    with step(f"installing {', '.join(missing)} (first use of this source)"):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"pip exited {done.returncode}"])[-1]
        raise ConfigError(f"{config_path}: field 'source.requires': cannot install {', '.join(missing)}: {reason}")
    importlib.invalidate_caches()


def model_folder(
    source: SourceConfig, config_path: Path, cache_root: Path, dataset: Dataset | None = None
) -> tuple[Path, dict[str, Any]]:
    """The model folder and a description of where it came from, for the manifest."""
    install_missing(source.requires, config_path)
    described: dict[str, Any]
    if source.finetune is not None:
        if dataset is None:
            raise ConfigError(f"{config_path}: field 'source.finetune': needs the evaluation data to train on")
        base, base_described = model_folder(source.finetune.base, config_path, cache_root)
        folder = finetuned_folder(base, source.finetune, dataset.train, dataset.label_names, cache_root)
        settings = source.finetune.model_dump(exclude={"base"})
        described = {"kind": "finetune", "base": base_described, "settings": settings, "path": str(folder.resolve())}
    elif source.split_zip is not None:
        folder, distributions = split_zip_folder(source.split_zip, cache_root, config_path)
        described = {"kind": "split_zip", "distributions": distributions, "path": str(folder.resolve())}
    elif source.path is not None:
        folder = resolve(config_path, source.path)
        described = {"kind": "folder", "path": str(folder.resolve())}
    else:
        package = str(source.package)
        if source.function:
            package_root(package, config_path, "source.package")
            module = importlib.import_module(package)
            locate = getattr(module, source.function, None)
            if not callable(locate):
                raise ConfigError(
                    f"{config_path}: field 'source.function': {source.function!r} is not a function of {package}"
                )
            folder = Path(locate())
        else:
            folder = package_root(package, config_path, "source.package") / str(source.subdir)
        described = {
            "kind": "package",
            "package": package_version(package) or package,
            "path": str(folder.resolve()),
        }
    if not folder.is_dir():
        raise ConfigError(f"{config_path}: field 'source': {folder} is not a folder")
    return folder, described


def data_path(data: DataFile, config_path: Path) -> Path:
    if data.path is not None:
        path = resolve(config_path, data.path)
    else:
        path = package_root(str(data.package), config_path, "eval.data.package") / str(data.file)
    if not path.is_file():
        raise ConfigError(f"{config_path}: field 'eval.data': {path} is not a file")
    return path
