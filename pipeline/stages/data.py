"""Load the labelled evaluation data once; export validation and evaluation both read it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import EvalConfig
from pipeline.data import load_dataset
from pipeline.sources import data_path
from pipeline.state import BuildContext, BuildState


@dataclass(frozen=True)
class DataStage:
    config: EvalConfig
    name: str = "data"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        path = data_path(self.config.data, context.config_path)
        return replace(state, dataset=load_dataset(path, self.config, context.config_path))
